"""Cluster launcher: renders Ansible inventories and drives playbooks (see issue: launcher)."""
