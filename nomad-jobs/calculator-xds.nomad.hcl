# The calculator mesh on bridge networking, with ferry in Envoy's place
# configured exactly as Envoy is: by the Consul agent's xDS server, from the
# bootstrap file Nomad writes for the sidecar.
#
#   curl --> frontend app --> frontend's ferry ==mTLS==> add-svc's ferry --> add-svc app
#                                              ==mTLS==> sub-svc's ferry --> sub-svc app
#
# What Nomad does for each `sidecar_service`, unchanged from Envoy: it
# registers the sidecar, runs `consul connect envoy -bootstrap` and writes
# the result to ${NOMAD_SECRETS_DIR}/envoy_bootstrap.json (node ID, the
# agent's gRPC address - in bridge mode the unix socket
# alloc/tmp/consul_grpc.sock - and the service identity token), then starts
# the sidecar task with Envoy's arguments. Here the task runs a container
# image holding ferry and ferry-envoy (`ferry:local`, see README.md) with the same
# arguments Nomad gives Envoy, after `envoy`:
#
#   -c ${NOMAD_SECRETS_DIR}/envoy_bootstrap.json -l ${meta.connect.log_level}
#   --concurrency ${meta.connect.proxy_concurrency} --disable-hot-restart
#
# ferry needs no CONSUL_HTTP_ADDR or token file: everything is in the
# bootstrap. The socket path is relative, resolved from the container's
# working directory "/" where Nomad mounts the allocation directory at
# /alloc, as for Envoy. Intentions arrive as RBAC over xDS.
#
# Run: nomad job run calculator-xds.nomad.hcl (see README.md).

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

job "calculator-xds" {
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
      # It is also the last part of the service ID Nomad registers.
      port = "8080"

      connect {
        sidecar_service {}

        sidecar_task {
          # Envoy's image replaced by ferry's; Envoy's arguments kept.
          driver = "docker"

          config {
            image   = "ferry:local"
            command = "/usr/local/bin/ferry"
            args = [
              "envoy",
              "-c",
              "${NOMAD_SECRETS_DIR}/envoy_bootstrap.json",
              "-l",
              "${meta.connect.log_level}",
              "--concurrency",
              "${meta.connect.proxy_concurrency}",
              "--disable-hot-restart",
            ]
            work_dir = "/"
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

      connect {
        sidecar_service {}

        sidecar_task {
          # Envoy's image replaced by ferry's; Envoy's arguments kept.
          driver = "docker"

          config {
            image   = "ferry:local"
            command = "/usr/local/bin/ferry"
            args = [
              "envoy",
              "-c",
              "${NOMAD_SECRETS_DIR}/envoy_bootstrap.json",
              "-l",
              "${meta.connect.log_level}",
              "--concurrency",
              "${meta.connect.proxy_concurrency}",
              "--disable-hot-restart",
            ]
            work_dir = "/"
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
      # carries the host port curl can use. The service ID ends in the label,
      # "http".
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

            upstreams {
              destination_name = "sub-svc"
              local_bind_port  = 9002
            }
          }
        }

        sidecar_task {
          # Envoy's image replaced by ferry's; Envoy's arguments kept.
          driver = "docker"

          config {
            image   = "ferry:local"
            command = "/usr/local/bin/ferry"
            args = [
              "envoy",
              "-c",
              "${NOMAD_SECRETS_DIR}/envoy_bootstrap.json",
              "-l",
              "${meta.connect.log_level}",
              "--concurrency",
              "${meta.connect.proxy_concurrency}",
              "--disable-hot-restart",
            ]
            work_dir = "/"
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
        # 127.0.0.1:9001 and 127.0.0.1:9002 (Nomad writes "-" as "_").
        ADD_SVC_ADDR = "${NOMAD_UPSTREAM_ADDR_add_svc}"
        SUB_SVC_ADDR = "${NOMAD_UPSTREAM_ADDR_sub_svc}"
      }

      resources {
        cpu    = 100
        memory = 64
      }
    }
  }
}
