# The worker image with a user's code and its requirements: FROM conveyor's worker image, built by
# `make build` / `make up` on the compose stack for a config that sets code_requirements (README,
# "Your own tasks"). The build context is the config's code_dir; conveyor passes the base image as
# the build argument BASE_IMAGE (its compose files' CONVEYOR_IMAGE, default conveyor-worker:latest).
#   docker build --network host -f deploy/user.Dockerfile --build-arg BASE_IMAGE=conveyor-worker:latest \
#       --build-arg REQUIREMENTS=requirements.txt -t my-worker examples/wordcount
ARG BASE_IMAGE=conveyor-worker:latest
FROM ${BASE_IMAGE}

ARG REQUIREMENTS=requirements.txt
USER root
# The requirements first, in a layer of their own: editing the code does not reinstall them.
COPY ${REQUIREMENTS} /opt/conveyor/requirements.txt
RUN pip install --no-cache-dir -r /opt/conveyor/requirements.txt
COPY . /opt/conveyor/code/
RUN chmod -R a+rX /opt/conveyor/code
USER conveyor

# Where the workers import the user's code from (the config's code_dir, inside the image).
ENV CONVEYOR_CODE_DIR=/opt/conveyor/code
