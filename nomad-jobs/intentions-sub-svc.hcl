# frontend may call sub-svc.
#   consul config write intentions-sub-svc.hcl

Kind = "service-intentions"
Name = "sub-svc"

Sources = [
  {
    Name   = "frontend"
    Action = "allow"
  },
]
