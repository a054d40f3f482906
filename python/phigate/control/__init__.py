"""The control loop: answers the data plane's requests; reloads, signals, systemd notifications."""
