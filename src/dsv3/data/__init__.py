"""dsv3.data"""
