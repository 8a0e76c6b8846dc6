"""dsv3.plan"""
