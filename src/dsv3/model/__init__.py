"""dsv3.model"""
