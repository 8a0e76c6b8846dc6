"""dsv3.train"""
