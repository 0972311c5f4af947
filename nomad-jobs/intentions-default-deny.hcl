# Deny by default: no service may call another unless an intention for the
# destination allows it. Consul applies the most specific intention first,
# so the exact-name allows in intentions-add-svc.hcl and
# intentions-sub-svc.hcl win over this one.
#
# With Consul ACLs and acl.default_policy = "deny", deny is already the
# default; this entry makes it explicit and also holds without ACLs.
#
# consul config write takes one config entry per file:
#   consul config write intentions-default-deny.hcl

Kind = "service-intentions"
Name = "*"

Sources = [
  {
    Name   = "*"
    Action = "deny"
  },
]
