# bids_uad BIDS-App image.
#
#   docker build -t bids_uad:0.1.0 -t bids_uad .                         # with FSL (default)
#   docker build --build-arg WITH_FSL=false -t bids_uad:0.1.0-nofsl .     # Python backends only
#   make image                                                           # docker/build_image.sh
#
# Stages: fsl-true/fsl-false (FSL TOPUP, EDDY, BET, FAST from FSL's conda channel, or an empty
# /opt/fsl), build (virtualenv with the pinned CPU torch and the package), templates-true/-false
# (MNI templates fetched once at build time, or none), and the slim runtime image.
#
# Build arguments (the defaults are the official images and servers; docs/containers.md):
#   RUNTIME_IMAGE      base of the runtime stage
#   BUILD_IMAGE        base of the build stage; it must hold the same Python (version and path) as
#                      RUNTIME_IMAGE, because the runtime copies the build's virtualenv
#   TORCH_PIP_ARGS     where pip finds the CPU torch wheel (default: the PyTorch CPU index), e.g.
#                      "--find-links http://127.0.0.1:8765/" for a local wheel folder
#   WITH_TEMPLATEFLOW  true: bake in TemplateFlow's MNI152NLin2009cAsym; false: download nothing,
#                      bids_uad then uses nilearn's MNI152NLin2009aSym (and says so in its log)
#   BUILD_CA_CERTS     PEM text of extra CA certificates trusted by pip (and TemplateFlow) in the
#                      build stages only, e.g. behind a TLS-intercepting proxy:
#                      --build-arg BUILD_CA_CERTS="$(cat /usr/local/share/ca-certificates/*.crt)"
#                      The runtime image never contains them.
# No "# syntax=" line on purpose: that fetches a frontend image from Docker Hub.

ARG WITH_FSL=true
ARG WITH_TEMPLATEFLOW=true
ARG RUNTIME_IMAGE=python:3.11-slim-bookworm
ARG BUILD_IMAGE=python:3.11-slim-bookworm
ARG MICROMAMBA_IMAGE=mambaorg/micromamba:1.5.10
ARG TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"

# ---------------------------------------------------------------- FSL (conda) -----------
FROM ${MICROMAMBA_IMAGE} AS fsl-true
ARG FSL_CHANNEL=https://fsl.fmrib.ox.ac.uk/fsldownloads/fslconda/public/
# CPU-only eddy; bet2 brings the `bet` wrapper and the avwutils it calls
ARG FSL_PACKAGES="fsl-topup fsl-eddy-cpu fsl-bet2 fsl-fast4"
USER root
RUN micromamba create --yes --prefix /opt/fsl \
        --channel ${FSL_CHANNEL} --channel conda-forge --override-channels \
        ${FSL_PACKAGES} \
 && if [ ! -e /opt/fsl/bin/eddy ] && [ -e /opt/fsl/bin/eddy_cpu ]; then ln -s eddy_cpu /opt/fsl/bin/eddy; fi \
 && for prog in topup applytopup eddy bet fast; do \
        test -x /opt/fsl/bin/$prog || { echo "FSL program $prog missing" >&2; exit 1; }; \
    done \
 && micromamba clean --all --yes \
 && rm -rf /opt/fsl/pkgs /opt/fsl/include /opt/fsl/share/doc /opt/fsl/share/man \
 && find /opt/fsl -name '*.a' -delete

# WITH_FSL=false: an empty FSL folder, so the runtime stage copies the same path either way
FROM ${RUNTIME_IMAGE} AS fsl-false
RUN mkdir -p /opt/fsl

FROM fsl-${WITH_FSL} AS fsl

# ---------------------------------------------------------------- Python build -----------
FROM ${BUILD_IMAGE} AS build
ARG TORCH_PIP_ARGS
ARG BUILD_CA_CERTS=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# extra CA certificates (BUILD_CA_CERTS) join the system bundle, which pip and requests then use
RUN if [ -n "$BUILD_CA_CERTS" ]; then \
        printf '%s\n' "$BUILD_CA_CERTS" > /usr/local/share/ca-certificates/bids_uad-build-extra.crt \
     && update-ca-certificates \
     && printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > /etc/pip.conf; \
    fi \
 && python -m venv /opt/venv
# the CPU build of torch first, from the PyTorch CPU wheel index (TORCH_PIP_ARGS): an unpinned
# torch from PyPI pulls several GB of CUDA packages
RUN /opt/venv/bin/pip install ${TORCH_PIP_ARGS} "torch==2.13.0"
COPY constraints.txt ./
COPY pyproject.toml setup.cfg README.md ./
COPY bids_uad ./bids_uad
RUN /opt/venv/bin/pip install -c constraints.txt . \
 && /opt/venv/bin/python -c "import torch; assert torch.__version__.split('+')[0] == '2.13.0', torch.__version__; assert not torch.version.cuda, 'CUDA torch installed'"

# ---------------------------------------------------------------- templates --------------
# WITH_TEMPLATEFLOW=true: fetched at BUILD time with TemplateFlow's python API; nothing is
# downloaded at run time
FROM build AS templates-true
ENV TEMPLATEFLOW_HOME=/opt/templateflow
COPY docker/fetch_templates.py /usr/local/bin/bids_uad-fetch-templates
RUN if [ -s /usr/local/share/ca-certificates/bids_uad-build-extra.crt ]; then \
        export REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt; \
    fi \
 && /opt/venv/bin/python /usr/local/bin/bids_uad-fetch-templates \
 && find /opt/templateflow -mindepth 1 -maxdepth 1 ! -name 'tpl-MNI152NLin2009cAsym' -exec rm -rf {} + \
 && chmod -R a+rX /opt/templateflow

# WITH_TEMPLATEFLOW=false: no download; the marker tells `bids_uad-fetch-templates --check` the
# files were left out on purpose (bids_uad falls back to nilearn's template)
FROM build AS templates-false
ENV TEMPLATEFLOW_HOME=/opt/templateflow
COPY docker/fetch_templates.py /usr/local/bin/bids_uad-fetch-templates
RUN /opt/venv/bin/python /usr/local/bin/bids_uad-fetch-templates --skip \
 && chmod -R a+rX /opt/templateflow

FROM templates-${WITH_TEMPLATEFLOW} AS templates

# ---------------------------------------------------------------- runtime ----------------
FROM ${RUNTIME_IMAGE} AS runtime
ARG WITH_FSL
ARG WITH_TEMPLATEFLOW
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="bids_uad" \
      org.opencontainers.image.description="Unsupervised anomaly detection in diffusion MRI (BIDS-App)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      bids_uad.with-fsl="${WITH_FSL}" \
      bids_uad.with-templateflow="${WITH_TEMPLATEFLOW}"

COPY --from=fsl /opt/fsl /opt/fsl
COPY --from=build /opt/venv /opt/venv
COPY --from=templates /opt/templateflow /opt/templateflow
COPY docker/entrypoint.sh /usr/local/bin/bids_uad-entrypoint
COPY docker/fetch_templates.py /usr/local/bin/bids_uad-fetch-templates

# HOME and every cache live under /tmp: the image works with a read-only root filesystem
# (docker run --read-only --tmpfs /tmp) and under any --user uid; the entry point creates them.
# FSL's bin comes last so the venv's python stays first on PATH.
ENV FSLDIR=/opt/fsl \
    FSLOUTPUTTYPE=NIFTI_GZ \
    FSLMULTIFILEQUIT=TRUE \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/opt/fsl/bin \
    TEMPLATEFLOW_HOME=/opt/templateflow \
    TEMPLATEFLOW_AUTOUPDATE=0 \
    HOME=/tmp/home \
    XDG_CACHE_HOME=/tmp/home/.cache \
    MPLCONFIGDIR=/tmp/home/.config/matplotlib \
    NUMBA_CACHE_DIR=/tmp/home/.cache/numba \
    TORCH_HOME=/tmp/home/.cache/torch \
    BIDS_UAD_CACHE=/tmp/home/.cache/bids_uad \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

RUN chmod 0755 /usr/local/bin/bids_uad-entrypoint /usr/local/bin/bids_uad-fetch-templates \
 && groupadd --gid 1000 bidsuad \
 && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /tmp/home --shell /usr/sbin/nologin bidsuad \
 && mkdir -p /data /out /work \
 && chown bidsuad:bidsuad /out /work \
 && /opt/venv/bin/python /usr/local/bin/bids_uad-fetch-templates --check \
 && /opt/venv/bin/bids_uad --version

USER bidsuad
WORKDIR /tmp
ENTRYPOINT ["/usr/local/bin/bids_uad-entrypoint"]
CMD ["--help"]
