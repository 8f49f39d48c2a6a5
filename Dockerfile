FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --system --uid 10001 --home-dir /var/lib/gateway --create-home gateway

WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install . && rm -rf /src

# No config is built in: mount yours at /etc/gateway/gateway.yaml (deploy/docker/ has
# an example; its backends must be addresses the container can reach, not 127.0.0.1).
ENV GATEWAY_CONFIG=/etc/gateway/gateway.yaml

USER gateway
WORKDIR /var/lib/gateway
EXPOSE 8080 9090

# Asks /healthz where $GATEWAY_CONFIG puts the admin listener (admin.host, admin.port).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-m", "gateway.healthcheck"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["gateway"]
CMD ["run", "-c", "/etc/gateway/gateway.yaml"]
