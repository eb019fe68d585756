"""``bootstrap demo``: a throwaway systemd machine on this host, provisioned from examples/."""
