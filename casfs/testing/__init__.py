"""Tools shared by tests, benchmarks and the demo (never imported by casfs itself):

- ocibuild: OCI layouts and docker archives built from members, directories, a Python prefix
- seaweed: a SeaweedFS S3 server started on free ports and stopped by pid
- registry: the Debian docker-registry started for tests (auth, TLS, redirects)
- proxy: a latency- and fault-injecting TCP proxy (a remote store on one machine)
- mounting: real mounts made and always taken down (`casfs mount` in the background)
- doubles: the one in-memory store backend, and a fault-injecting wrapper for any backend
- sources: the project's own source files, for the tests that read the code
- faults, hostile, fuzz: the fault scenarios, hostile inputs and fuzz targets that both the
  tests and `python -m benchmarks.faults` run
"""
