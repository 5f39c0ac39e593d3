# A site's inspection service: `patchsvdd serve` on a bundle mounted at /bundle.
#
#   docker build -t patchsvdd .
#   docker run --rm -p 8080:8080 -v "$PWD/bundle:/bundle:ro" patchsvdd
#
# It installs only what serving needs: the package and its `serve` extra
# (requirements/core.txt and requirements/serve.txt; no OpenFL, Jupyter or
# papermill), with PyTorch's CPU wheels.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

COPY requirements ./requirements
COPY pyproject.toml README.md ./
COPY patchsvdd ./patchsvdd
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu ".[serve]"

RUN useradd --create-home inspector
USER inspector
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health')"
ENTRYPOINT ["patchsvdd", "serve", "/bundle", "--host", "0.0.0.0", "--port", "8080"]
