"""`mercli process`: processing jobs in processing/ run through analysis modules (SPEC §7).

A module is a host command or a container image that follows mercure's module contract
(`MERCURE_IN_DIR`/`MERCURE_OUT_DIR`, `task.json`, `<series>#<sop>.dcm` inputs, DICOM and an
optional `result.json` as output), so mercure modules run unchanged; `containers` builds the
documented, isolated command line for docker, podman and apptainer.
"""
