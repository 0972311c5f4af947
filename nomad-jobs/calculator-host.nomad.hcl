# The calculator mesh on host networking, with ferry started by the job
# itself: the pattern jobs used with `consul connect proxy` before Nomad had
# `connect` blocks, and still the way to put a mesh proxy next to an app on
# host networking (Nomad injects sidecars only into bridge or CNI groups).
#
#   curl --> frontend app --> frontend's ferry ==mTLS==> add-svc's ferry --> add-svc app
#                                              ==mTLS==> sub-svc's ferry --> sub-svc app
#
# Each ferry registers itself with the local Consul agent (-register): a
# connect-proxy service named <service>-proxy, ID
# <service>-proxy-<allocation ID>, with a TTL check ferry keeps passing, and
# deregisters at shutdown. The frontend's ferry finds add-svc and sub-svc
# instances through those registrations and checks the intentions
# (intentions-*.hcl) on every connection it accepts.
#
# Every port is dynamic, so two allocations of a group can share a host.
# The agent is the one on the host (127.0.0.1:8500, ferry's default). With
# Consul ACLs, give each ferry a token with service:write on its service
# (for example CONSUL_HTTP_TOKEN from a Nomad workload identity, or
# -token-file).
#
# Run: nomad job run calculator-host.nomad.hcl (see README.md).

locals {
  # Stands for the real add-svc and sub-svc: GET /?a=7&b=5 answers the sum
  # (OP=add) or the difference (OP=sub) as plain text.
  calc_py = <<-EOF
    import os
    from http.server import BaseHTTPRequestHandler, HTTPServer
    from urllib.parse import parse_qs, urlparse

    OPS = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b}
    op = OPS[os.environ["OP"]]

    class Calc(BaseHTTPRequestHandler):
        def do_GET(self):
            q = parse_qs(urlparse(self.path).query)
            a, b = (int(q.get(k, ["0"])[0]) for k in ("a", "b"))
            body = (str(op(a, b)) + "\n").encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    HTTPServer((os.environ["BIND"], int(os.environ["PORT"])), Calc).serve_forever()
  EOF

  # Stands for the real frontend: GET /?a=7&b=5 asks add-svc and sub-svc,
  # through the local ferry listeners named by ADD_SVC_ADDR and SUB_SVC_ADDR,
  # and shows both answers.
  frontend_py = <<-EOF
    import os
    import urllib.request
    from http.server import BaseHTTPRequestHandler, HTTPServer
    from urllib.parse import urlparse

    UPSTREAMS = (("add-svc", "ADD_SVC_ADDR"), ("sub-svc", "SUB_SVC_ADDR"))

    class Frontend(BaseHTTPRequestHandler):
        def do_GET(self):
            query = urlparse(self.path).query
            lines = []
            for name, var in UPSTREAMS:
                url = "http://" + os.environ[var] + "/?" + query
                try:
                    with urllib.request.urlopen(url, timeout=5) as r:
                        lines.append(name + ": " + r.read().decode().strip())
                except Exception as e:
                    lines.append(name + ": failed: " + str(e))
            body = ("\n".join(lines) + "\n").encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    HTTPServer((os.environ["BIND"], int(os.environ["PORT"])), Frontend).serve_forever()
  EOF
}

job "calculator-host" {
  datacenters = ["dc1"]
  type        = "service"

  group "add-svc" {
    count = 2

    network {
      port "http" {}  # the app, on 127.0.0.1 only: reachable through ferry alone
      port "proxy" {} # ferry's public mTLS listener, on every address of the host
    }

    # The app itself is not registered in Consul: mesh clients find add-svc
    # through the add-svc-proxy registration that ferry makes.
    task "app" {
      driver = "raw_exec"

      template {
        data        = local.calc_py
        destination = "local/calc.py"
      }

      config {
        command = "python3"
        args    = ["local/calc.py"]
      }

      env {
        OP   = "add"
        BIND = "127.0.0.1"
        PORT = "${NOMAD_PORT_http}"
      }

      resources {
        cpu    = 100
        memory = 64
      }
    }

    task "ferry" {
      driver = "raw_exec"

      # Up before the app and stopped after it. On SIGINT (Nomad's default
      # kill_signal) ferry drains open connections for 4s (-drain-timeout),
      # within Nomad's default 5s kill_timeout.
      lifecycle {
        hook    = "prestart"
        sidecar = true
      }

      config {
        command = "/usr/local/bin/ferry"
        args = [
          "-service", "add-svc",
          "-listen", ":${NOMAD_PORT_proxy}",
          "-service-addr", "127.0.0.1:${NOMAD_PORT_http}",
          "-register",
          "-register-id", "${NOMAD_ALLOC_ID}",
        ]
      }

      resources {
        cpu    = 100
        memory = 64
      }
    }
  }

  group "sub-svc" {
    count = 2

    network {
      port "http" {}
      port "proxy" {}
    }

    task "app" {
      driver = "raw_exec"

      template {
        data        = local.calc_py
        destination = "local/calc.py"
      }

      config {
        command = "python3"
        args    = ["local/calc.py"]
      }

      env {
        OP   = "sub"
        BIND = "127.0.0.1"
        PORT = "${NOMAD_PORT_http}"
      }

      resources {
        cpu    = 100
        memory = 64
      }
    }

    task "ferry" {
      driver = "raw_exec"

      lifecycle {
        hook    = "prestart"
        sidecar = true
      }

      config {
        command = "/usr/local/bin/ferry"
        args = [
          "-service", "sub-svc",
          "-listen", ":${NOMAD_PORT_proxy}",
          "-service-addr", "127.0.0.1:${NOMAD_PORT_http}",
          "-register",
          "-register-id", "${NOMAD_ALLOC_ID}",
        ]
      }

      resources {
        cpu    = 100
        memory = 64
      }
    }
  }

  group "frontend" {
    count = 1

    network {
      port "http" {}       # the frontend app, for curl
      port "proxy" {}      # ferry's public mTLS listener (frontend is in the mesh too)
      port "up_add_svc" {} # ferry's plain local listener for add-svc
      port "up_sub_svc" {} # ferry's plain local listener for sub-svc
    }

    task "app" {
      driver = "raw_exec"

      template {
        data        = local.frontend_py
        destination = "local/frontend.py"
      }

      config {
        command = "python3"
        args    = ["local/frontend.py"]
      }

      env {
        BIND         = "0.0.0.0"
        PORT         = "${NOMAD_PORT_http}"
        ADD_SVC_ADDR = "127.0.0.1:${NOMAD_PORT_up_add_svc}"
        SUB_SVC_ADDR = "127.0.0.1:${NOMAD_PORT_up_sub_svc}"
      }

      # The entry point, registered as a plain service so that its address
      # can be looked up (README.md).
      service {
        name     = "frontend"
        port     = "http"
        provider = "consul"

        check {
          type     = "tcp"
          interval = "10s"
          timeout  = "2s"
        }
      }

      resources {
        cpu    = 100
        memory = 64
      }
    }

    task "ferry" {
      driver = "raw_exec"

      lifecycle {
        hook    = "prestart"
        sidecar = true
      }

      config {
        command = "/usr/local/bin/ferry"
        args = [
          "-service", "frontend",
          "-listen", ":${NOMAD_PORT_proxy}",
          "-service-addr", "127.0.0.1:${NOMAD_PORT_http}",
          "-register",
          "-register-id", "${NOMAD_ALLOC_ID}",
          # 127.0.0.1 is implied; the ports are dynamic because another
          # frontend allocation may run on the same host.
          "-upstream", "add-svc:${NOMAD_PORT_up_add_svc}",
          "-upstream", "sub-svc:${NOMAD_PORT_up_sub_svc}",
        ]
      }

      resources {
        cpu    = 100
        memory = 64
      }
    }
  }
}
