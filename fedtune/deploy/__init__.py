"""Deployment on Flower's own engine: certificates, node keys, and the commands that start each role."""
