"""dsv3.post"""
