"""Deployment on Flower's own engine: certificates, node keys, each role's command."""
