"""The only package that imports flwr: records, the ClientApp, the ServerApp and the launcher.

A Flower upgrade should touch these files and nothing else.
"""
