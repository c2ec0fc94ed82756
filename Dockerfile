# pqe2ee in a container: the proxy by default, the instance or relay by command:
#   docker build -t pqe2ee .
#   docker run --rm -p 127.0.0.1:8787:8787 -e PQE2EE_PROXY_API_KEY=cpk_... pqe2ee
#   docker run --rm -p 8002:8002 pqe2ee instance --upstream http://engine:8000
# The one install step is scripts/install.sh, which tests/test_install.py runs in a fresh venv
# (Docker itself is not part of the test suite).
FROM python:3.12-slim
COPY . /src
RUN sh /src/scripts/install.sh /opt/pqe2ee proxy,server,redis && rm -rf /src
RUN useradd --system --no-create-home pqe2ee
USER pqe2ee
# Inside the container the servers listen on every interface; publish the proxy's port on
# loopback only (-p 127.0.0.1:8787:8787) and name that address with --allow-host.
ENV PQE2EE_PROXY_HOST=0.0.0.0 \
    PQE2EE_INSTANCE_HOST=0.0.0.0 \
    PQE2EE_RELAY_HOST=0.0.0.0 \
    PQE2EE_LOG_FORMAT=json
EXPOSE 8787 8002 8000
# No HEALTHCHECK: the port depends on the command; probe GET /health (liveness) and GET /ready
# (dependencies) from the orchestrator instead.
ENTRYPOINT ["/opt/pqe2ee/bin/pqe2ee"]
CMD ["proxy"]
