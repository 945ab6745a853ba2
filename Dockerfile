# One image for the worker, the API and the one-shot jobs (migrate, topics).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    STACK_DIR=/var/lib/flexoraa

WORKDIR /app
COPY pyproject.toml README.md ./
COPY flexoraa ./flexoraa
COPY streams ./streams
COPY api ./api
COPY connectors ./connectors
COPY schemas ./schemas
RUN pip install . \
    && useradd --system --home-dir /var/lib/flexoraa --create-home flexoraa

USER flexoraa
ENTRYPOINT ["flexoraa"]
CMD ["--help"]
