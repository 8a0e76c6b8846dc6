"""dsv3.kernels"""
