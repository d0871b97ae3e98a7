"""Validates compose files against the Compose Specification schema (from the docker-compose
wheel, see scripts/install-deps.sh), then checks what the schema cannot: every file a service
mounts exists, and every image is pinned to a version tag.

    python check_compose.py SCHEMA FILE...      (prints one line per file; exit 1 on a problem)
"""
import json
import os
import sys

import jsonschema
import yaml


def check(schema, path):
    problems = []
    with open(path) as f:
        doc = yaml.safe_load(f)
    for err in jsonschema.Draft7Validator(schema).iter_errors(doc):
        problems.append(f"schema: {'/'.join(map(str, err.path))}: {err.message}")
    base = os.path.dirname(os.path.abspath(path))
    for name, svc in (doc.get("services") or {}).items():
        image = svc.get("image", "")
        tag = image.rsplit(":", 1)[1] if ":" in image.split("/")[-1] else ""
        if not tag or tag == "latest":
            problems.append(f"{name}: image {image!r} is not pinned to a version")
        for vol in svc.get("volumes") or []:
            src = vol.split(":")[0] if isinstance(vol, str) else vol.get("source", "")
            if src.startswith((".", "/")) and not os.path.exists(os.path.join(base, src)):
                problems.append(f"{name}: mounted {src} does not exist")
    return doc, problems


def main():
    with open(sys.argv[1]) as f:
        schema = json.load(f)
    failed = False
    for path in sys.argv[2:]:
        doc, problems = check(schema, path)
        services = sorted((doc.get("services") or {}).keys())
        print(json.dumps({"file": path, "services": services, "problems": problems}))
        failed |= bool(problems)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
