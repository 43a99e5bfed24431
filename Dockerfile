# The bridge and demo engine image. Install steps match the README's set-up (pip install -e .).
FROM python:3.11-slim
WORKDIR /app
# flowscope/<component> are symlinks to the folders beside it: every folder they name is copied.
COPY pyproject.toml README.md ./
COPY engine engine
COPY collector collector
COPY ws_bridge ws_bridge
COPY contract contract
COPY flowscope flowscope
COPY examples examples
RUN pip install --no-cache-dir -e .
EXPOSE 8080 4319
HEALTHCHECK --interval=10s --timeout=3s --retries=5 CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz')"
CMD ["flowscope", "bridge", "--host", "0.0.0.0"]
