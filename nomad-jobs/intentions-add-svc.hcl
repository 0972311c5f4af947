# frontend may call add-svc.
#   consul config write intentions-add-svc.hcl

Kind = "service-intentions"
Name = "add-svc"

Sources = [
  {
    Name   = "frontend"
    Action = "allow"
  },
]
