"""Fill the real hub clients' caches, and serve a loopback Kaggle API.

`huggingface_hub` (offline mode) and `kagglehub` then find the files exactly
as they would after a real download; our resolution code runs unmodified.
"""

import hashlib
import http.server
import json
import os
import shutil
import threading

import pytest


def fill_hf_cache(repo_id, folder, revision="main"):
    """Copy `folder` into the HF cache as repo `repo_id` at `revision`."""
    cache = os.environ["HF_HUB_CACHE"]
    repo_dir = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    snapshot = os.path.join(repo_dir, "snapshots", commit)
    blobs = os.path.join(repo_dir, "blobs")
    os.makedirs(blobs, exist_ok=True)
    for root, _, files in os.walk(folder):
        for name in files:
            src = os.path.join(root, name)
            rel = os.path.relpath(src, folder)
            with open(src, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            blob = os.path.join(blobs, digest)
            if not os.path.exists(blob):
                shutil.copyfile(src, blob)
            dst = os.path.join(snapshot, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if os.path.lexists(dst):
                os.remove(dst)
            os.symlink(os.path.relpath(blob, os.path.dirname(dst)), dst)
    os.makedirs(os.path.join(repo_dir, "refs"), exist_ok=True)
    with open(os.path.join(repo_dir, "refs", revision), "w") as f:
        f.write(commit)
    return snapshot


def fill_kaggle_cache(handle, folder):
    """Copy `folder` into the kagglehub cache as `OWNER/MODEL/FW/VAR/VERSION`."""
    owner, model, framework, variation, version = handle.split("/")
    base = os.path.join(
        os.environ["KAGGLEHUB_CACHE"], "models", owner, model, framework, variation
    )
    target = os.path.join(base, version)
    if os.path.exists(target):
        shutil.rmtree(target)
    shutil.copytree(folder, target)
    with open(os.path.join(base, f"{version}.complete"), "w"):
        pass
    return target


class _KaggleApi(http.server.BaseHTTPRequestHandler):
    versions = {}
    requests = []

    def do_POST(self):  # noqa: N802 (http.server naming)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        request = json.loads(body or b"{}")
        type(self).requests.append((self.path, request))
        if self.path.endswith("/models.ModelApiService/GetModelInstance"):
            key = (request.get("ownerSlug"), request.get("modelSlug"))
            key += (request.get("instanceSlug"),)
            if key in self.versions:
                self._reply(200, {"versionNumber": self.versions[key]})
                return
            self._reply(404, {"code": 404, "message": "Model instance not found"})
            return
        self._reply(404, {"code": 404, "message": f"unsupported {self.path}"})

    def _reply(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def kaggle_api(monkeypatch):
    """A loopback Kaggle API behind kagglesdk's TEST environment.

    kagglesdk points TEST at a fixed localhost:7777; tests run in parallel
    workers, so each server takes a free port and the TEST endpoint is set to it.
    """
    from kagglesdk import kaggle_env

    _KaggleApi.versions = {}
    _KaggleApi.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _KaggleApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setitem(
        kaggle_env._env_to_endpoint, kaggle_env.KaggleEnv.TEST, endpoint
    )
    monkeypatch.setenv("KAGGLE_API_ENVIRONMENT", "TEST")
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    try:
        yield _KaggleApi
    finally:
        server.shutdown()
        server.server_close()
