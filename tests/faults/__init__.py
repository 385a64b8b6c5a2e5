"""Fault campaigns: a real daemon against hostile hubs, clients, stores and models; kills, full
disks, soak; and the hypothesis campaign of hostile catalog documents."""
