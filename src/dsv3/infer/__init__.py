"""dsv3.infer"""
