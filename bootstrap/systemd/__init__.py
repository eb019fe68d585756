"""systemd stage."""
