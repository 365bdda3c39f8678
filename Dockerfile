# One image for the API, the workers and the migration step (docker-compose.yml picks the command).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /srv/must

# torch first, in its own layer: it is by far the largest and changes least often.
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
RUN pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

COPY pyproject.toml README.md ./
COPY must_engine ./must_engine
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations
# Editable, so app/alembic.ini finds migrations/ beside it.
RUN pip install -e .

RUN useradd --create-home --uid 1000 must && mkdir -p /data && chown must /data
USER must
ENV MUST_DATA_DIR=/data
VOLUME ["/data"]
EXPOSE 8000

CMD ["must", "serve", "--host", "0.0.0.0", "--port", "8000"]
