# The calculator mesh on bridge networking, with Nomad's own Consul service
# mesh integration (`connect` blocks) and ferry as the sidecar instead of
# Envoy.
#
#   curl --> frontend app --> frontend's ferry ==mTLS==> add-svc's ferry --> add-svc app
#                  (unix socket) frontend's ferry ==mTLS==> sub-svc's ferry --> sub-svc app
#
#   Consul's HTTP check --> add-svc's ferry (exposed /health, plain HTTP) --> add-svc app
#
# What Nomad does for each `sidecar_service`: it registers the service as
# _nomad-task-<alloc ID>-group-<group>-<service>-<port> and its sidecar as
# the same ID plus "-sidecar-proxy" (name <service>-sidecar-proxy), with the
# upstreams of `proxy { upstreams {} }`, Proxy.Config.bind_address 0.0.0.0
# and bind_port = the sidecar's port inside the allocation's network
# namespace. It then starts the `sidecar_task`, here ferry under raw_exec.
# ferry reads that registration (-sidecar-for) and binds where
# Proxy.Config.bind_address/bind_port say, as Envoy does.
#
# What Nomad does NOT do for a sidecar task, hence the `env` blocks below:
#   - it sets no CONSUL_HTTP_ADDR (only Connect-native tasks get one), and
#     127.0.0.1:8500 inside the bridge namespace is not the host's agent;
#   - it passes no token in the environment: with Consul ACLs it writes the
#     service identity token to ${NOMAD_SECRETS_DIR}/si_token, and without
#     ACLs that file does not exist.
#
# Because a sidecar_task with a driver other than docker replaces Envoy's
# `config` entirely, there is no image and no Envoy bootstrap file to
# override. Nomad still runs `consul connect envoy -bootstrap` on the client
# before starting the sidecar (the output is unused), so the `consul` binary
# must be installed there; and it only places sidecars on clients whose
# agent has a gRPC port. See README.md.
#
# Run: nomad job run calculator-bridge.nomad.hcl (see README.md).

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
            if urlparse(self.path).path == "/health":
                self.send_response(200)
                self.send_header("Content-Length", "3")
                self.end_headers()
                self.wfile.write(b"ok\n")
                return
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

  # Stands for the real frontend: GET /?a=7&b=5 asks add-svc through the
  # local ferry listener named by ADD_SVC_ADDR (host:port) and sub-svc
  # through the Unix socket named by SUB_SVC_SOCK, and shows both answers.
  frontend_py = <<-EOF
    import http.client
    import os
    import socket
    from http.server import BaseHTTPRequestHandler, HTTPServer
    from urllib.parse import urlparse

    class UnixHTTPConnection(http.client.HTTPConnection):
        def __init__(self, path):
            super().__init__("localhost", timeout=5)
            self.socket_path = path

        def connect(self):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            s.connect(self.socket_path)
            self.sock = s

    def ask(name, query):
        if name == "add-svc":
            host, port = os.environ["ADD_SVC_ADDR"].rsplit(":", 1)
            conn = http.client.HTTPConnection(host, int(port), timeout=5)
        else:
            conn = UnixHTTPConnection(os.environ["SUB_SVC_SOCK"])
        conn.request("GET", "/?" + query)
        return conn.getresponse().read().decode().strip()

    class Frontend(BaseHTTPRequestHandler):
        def do_GET(self):
            query = urlparse(self.path).query
            lines = []
            for name in ("add-svc", "sub-svc"):
                try:
                    lines.append(name + ": " + ask(name, query))
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

job "calculator-bridge" {
  datacenters = ["dc1"]
  type        = "service"

  group "add-svc" {
    count = 2

    # Each allocation gets its own network namespace, so the app can use a
    # fixed port inside it. Nomad adds the sidecar's dynamic port itself.
    network {
      mode = "bridge"
    }

    service {
      name = "add-svc"
      # A number, not a port label: the app's port inside the namespace.
      # It is also the last part of the service ID that -sidecar-for names.
      port = "8080"

      # An HTTP check of the app's /health, which Nomad exposes through the
      # sidecar (expose = true): it adds a dynamic port to the group, puts
      # the path in Proxy.Expose.Paths (path /health, local_path_port 8080,
      # listener_port that port) and points the check at it. ferry serves
      # exactly that path there, plain HTTP, and nothing else of the app.
      check {
        name     = "add-svc health"
        type     = "http"
        path     = "/health"
        interval = "10s"
        timeout  = "2s"
        expose   = true
      }

      connect {
        sidecar_service {}

        sidecar_task {
          # A driver other than docker: Envoy's image and arguments are
          # dropped, and only this config is used.
          driver = "raw_exec"

          config {
            command = "/usr/local/bin/ferry"
            args = [
              "-sidecar-for",
              "_nomad-task-${NOMAD_ALLOC_ID}-group-${NOMAD_GROUP_NAME}-add-svc-8080",
            ]
          }

          env {
            # Nomad gives sidecar tasks no agent address. This is the host's
            # agent, which must listen on the host's IP (README.md).
            CONSUL_HTTP_ADDR = "http://${attr.unique.network.ip-address}:8500"
            # With Consul ACLs, Nomad writes the service identity token here.
            # Without ACLs the file never appears; ferry then logs a warning
            # and goes on without a token, so the line can stay either way.
            CONSUL_HTTP_TOKEN_FILE = "${NOMAD_SECRETS_DIR}/si_token"
          }
        }
      }
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
        OP   = "add"
        BIND = "127.0.0.1" # inside the namespace: only ferry reaches it
        PORT = "8080"
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
      mode = "bridge"
    }

    service {
      name = "sub-svc"
      port = "8080"

      # An HTTP check of the app's /health, which Nomad exposes through the
      # sidecar (expose = true): it adds a dynamic port to the group, puts
      # the path in Proxy.Expose.Paths (path /health, local_path_port 8080,
      # listener_port that port) and points the check at it. ferry serves
      # exactly that path there, plain HTTP, and nothing else of the app.
      check {
        name     = "sub-svc health"
        type     = "http"
        path     = "/health"
        interval = "10s"
        timeout  = "2s"
        expose   = true
      }

      connect {
        sidecar_service {}

        sidecar_task {
          driver = "raw_exec"

          config {
            command = "/usr/local/bin/ferry"
            args = [
              "-sidecar-for",
              "_nomad-task-${NOMAD_ALLOC_ID}-group-${NOMAD_GROUP_NAME}-sub-svc-8080",
            ]
          }

          env {
            CONSUL_HTTP_ADDR = "http://${attr.unique.network.ip-address}:8500"
            # Only with Consul ACLs; remove without them (see add-svc).
            CONSUL_HTTP_TOKEN_FILE = "${NOMAD_SECRETS_DIR}/si_token"
          }
        }
      }
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
        PORT = "8080"
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
      mode = "bridge"

      # The entry point for curl: a dynamic host port forwarded to 8080 in
      # the namespace.
      port "http" {
        to = 8080
      }
    }

    service {
      name = "frontend"
      # A port label this time, so that the frontend's Consul registration
      # carries the host port curl can use. The service ID (and so the
      # -sidecar-for value) ends in the label, "http".
      port = "http"

      connect {
        sidecar_service {
          proxy {
            # The label maps to a different port inside the namespace, and
            # Consul would otherwise send inbound mesh traffic to the host
            # port number.
            local_service_port = 8080

            # ferry listens on 127.0.0.1:<local_bind_port> in the namespace
            # and Nomad tells the app where: NOMAD_UPSTREAM_ADDR_add_svc.
            upstreams {
              destination_name = "add-svc"
              local_bind_port  = 9001
            }

            # A Unix socket instead of a port: ferry creates the file
            # (removing a stale socket left by a crash), sets its mode and
            # removes it when it stops. raw_exec tasks share the host's
            # file system, so the app finds it at the same path.
            upstreams {
              destination_name       = "sub-svc"
              local_bind_socket_path = "/tmp/calculator-bridge-sub-svc.sock"
              local_bind_socket_mode = "0600"
            }
          }
        }

        sidecar_task {
          driver = "raw_exec"

          config {
            command = "/usr/local/bin/ferry"
            args = [
              "-sidecar-for",
              "_nomad-task-${NOMAD_ALLOC_ID}-group-${NOMAD_GROUP_NAME}-frontend-http",
            ]
          }

          env {
            CONSUL_HTTP_ADDR = "http://${attr.unique.network.ip-address}:8500"
            # Only with Consul ACLs; remove without them (see add-svc).
            CONSUL_HTTP_TOKEN_FILE = "${NOMAD_SECRETS_DIR}/si_token"
          }
        }
      }
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
        BIND = "0.0.0.0"
        PORT = "8080"
        # 127.0.0.1:9001 (Nomad writes "-" as "_").
        ADD_SVC_ADDR = "${NOMAD_UPSTREAM_ADDR_add_svc}"
        # The socket upstream's path (the same as local_bind_socket_path).
        SUB_SVC_SOCK = "/tmp/calculator-bridge-sub-svc.sock"
      }

      resources {
        cpu    = 100
        memory = 64
      }
    }
  }
}
