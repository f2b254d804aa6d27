#!/usr/bin/env python3
"""Validate the DPS message bodies recorded in dps-sim events files against the device API
schema (tests/e2e/schema/device-2025-07-01-preview.json), with the `jsonschema` package.

  register request bodies            -> DeviceRegistration
  200 / 202 response bodies          -> RegistrationOperationStatus
  other response bodies (errors)     -> ProvisioningServiceErrorDetails
  dropped answers, the TPM 401 challenge (not in the spec) and poll requests are skipped.

Prints one JSON object: {"checked": {definition: count}, "skipped": count,
"errors": [{"file", "line", "definition", "at", "message"}]}; exit status 0 when there are
no errors, 1 otherwise, 2 on bad arguments.
"""

import argparse
import json
import sys


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--schema", required=True)
    p.add_argument("events", nargs="+", help="dps-sim events files (JSON Lines)")
    a = p.parse_args()

    try:
        import jsonschema
    except ImportError as e:
        print(f"validate_bodies.py: cannot import jsonschema ({e}); run `make venv`", file=sys.stderr)
        return 2

    with open(a.schema, encoding="utf-8") as f:
        root = json.load(f)
    cls = jsonschema.validators.validator_for(root)
    cls.check_schema(root)
    validators = {}

    def validator(definition):
        if definition not in validators:
            schema = dict(root)
            schema["$ref"] = "#/$defs/" + definition
            validators[definition] = cls(schema, format_checker=cls.FORMAT_CHECKER)
        return validators[definition]

    checked, skipped, errors = {}, 0, []
    for path in a.events:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                e = json.loads(line)
                if e.get("service") != "dps":
                    continue
                if e.get("event") == "request" and e.get("kind") == "register":
                    definition = "DeviceRegistration"
                elif e.get("event") == "response":
                    if e.get("status") is None or e.get("tpm_challenge"):
                        skipped += 1
                        continue
                    ok = e["status"] in (200, 202)
                    definition = "RegistrationOperationStatus" if ok else "ProvisioningServiceErrorDetails"
                else:
                    continue
                body = e.get("body")
                checked[definition] = checked.get(definition, 0) + 1
                where = {"file": path, "line": n, "definition": definition}
                if not isinstance(body, (dict, list)):
                    errors.append(dict(where, at="", message=f"the body is not JSON: {str(body)[:200]!r}"))
                    continue
                for err in sorted(validator(definition).iter_errors(body), key=lambda x: list(x.absolute_path)):
                    at = "/" + "/".join(str(x) for x in err.absolute_path)
                    errors.append(dict(where, at=at, message=err.message[:300]))
    print(json.dumps({"checked": checked, "skipped": skipped, "errors": errors}))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
