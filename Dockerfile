# bids_uad BIDS-App image (first version; FSL stage and hardening come with the containers issue)
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml setup.cfg constraints.txt README.md ./
COPY bids_uad ./bids_uad
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0" \
 && /opt/venv/bin/pip install -c constraints.txt .

FROM python:3.11-slim
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    OMP_NUM_THREADS=1
RUN useradd --create-home --uid 1000 bidsuad
USER bidsuad
WORKDIR /tmp
ENTRYPOINT ["bids_uad"]
