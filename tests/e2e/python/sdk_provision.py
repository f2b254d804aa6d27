#!/usr/bin/env python3
"""Provision one device with Microsoft's Python device SDK (azure-iot-device 2.14.0).

Used by tests/e2e/tests/conformance.rs (the conformance suite) and by `dps-bench sdk`:
the SDK talks to dps-sim exactly as it would to Azure DPS (MQTT 3.1.1 over TLS on port
8883, api-version 2019-03-31, no CSR), so it has to run where `--host` port 8883 is the
simulator, i.e. inside the private network namespace the caller made.

Prints one JSON object on stdout:
  {"status", "operation_id", "assigned_hub", "device_id", "substatus",
   "register_seconds" (the register() call: connect, register, polls, disconnect),
   "process_seconds" (since this script started, the SDK import included)}
Exit status 0 when the registration is "assigned", 1 otherwise, 2 on bad arguments.
"""

import argparse
import json
import sys
import time

# Taken before the SDK import, which is part of what a fresh run costs.
T_START = time.monotonic()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="localhost", help="DPS host name (port 8883 is fixed by the SDK)")
    p.add_argument("--id-scope", required=True)
    p.add_argument("--registration-id", required=True)
    p.add_argument("--server-ca", required=True, help="PEM file the SDK trusts for the server")
    p.add_argument("--cert", help="X.509: device certificate (PEM, leaf first; a full chain is fine)")
    p.add_argument("--key", help="X.509: the device key (PEM)")
    p.add_argument("--symmetric-key", help="symmetric key of an individual enrollment (base64)")
    a = p.parse_args()

    try:
        from azure.iot.device import ProvisioningDeviceClient, X509
    except ImportError as e:  # the venv is made by `make venv`
        print(f"sdk_provision.py: cannot import azure-iot-device ({e}); run `make venv`", file=sys.stderr)
        return 2

    with open(a.server_ca, encoding="ascii") as f:
        server_ca = f.read()
    if a.cert and a.key:
        client = ProvisioningDeviceClient.create_from_x509_certificate(
            provisioning_host=a.host,
            registration_id=a.registration_id,
            id_scope=a.id_scope,
            x509=X509(cert_file=a.cert, key_file=a.key),
            server_verification_cert=server_ca,
        )
    elif a.symmetric_key:
        client = ProvisioningDeviceClient.create_from_symmetric_key(
            provisioning_host=a.host,
            registration_id=a.registration_id,
            id_scope=a.id_scope,
            symmetric_key=a.symmetric_key,
            server_verification_cert=server_ca,
        )
    else:
        print("sdk_provision.py: give --cert and --key, or --symmetric-key", file=sys.stderr)
        return 2

    t0 = time.monotonic()
    result = client.register()
    t1 = time.monotonic()
    state = result.registration_state
    out = {
        "status": result.status,
        "operation_id": result.operation_id,
        "assigned_hub": state.assigned_hub if state else None,
        "device_id": state.device_id if state else None,
        "substatus": state.sub_status if state else None,
        "register_seconds": round(t1 - t0, 6),
        "process_seconds": round(t1 - T_START, 6),
    }
    print(json.dumps(out))
    return 0 if result.status == "assigned" else 1


if __name__ == "__main__":
    sys.exit(main())
