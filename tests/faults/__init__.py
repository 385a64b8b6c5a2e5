"""Fault campaigns against a real daemon: hostile hubs, clients, stores and models; kills, full disks, soak."""
