"""SSH hosts driven by Ansible: inventory, plan, code sync, roles, log streaming."""
