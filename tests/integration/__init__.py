"""Integration tests with the real parts: daemon processes, inotify, sockets, onnxruntime, the loopback hub, systemd --user."""
