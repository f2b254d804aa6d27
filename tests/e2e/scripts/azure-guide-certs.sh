#!/usr/bin/env bash
# Makes test certificates the way Microsoft's Azure IoT X.509 setup guides do
# ("Tutorial: Provision multiple X.509 devices using enrollment groups" and the
# IoT Hub "create and upload certificates for testing" tutorial): openssl with
# the guide's two config files (openssl_root_ca.cnf, openssl_device_intermediate_ca.cnf),
# an RSA-4096 root and intermediate (extensions v3_ca and v3_intermediate_ca,
# keys protected with the guide's pass:1234), and device certificates with the
# usr_cert extensions (clientAuth, and a DNS subjectAltName) for a key made with
# `openssl genrsa -out device.key 2048`.
#
# Test material only: the keys are throw-away, made at test time.
#
# Usage:
#   azure-guide-certs.sh create_root_and_intermediate DIR
#   azure-guide-certs.sh create_device_certificate DIR REGISTRATION_ID [NAME]
#   azure-guide-certs.sh sign_device_csr DIR CSR NAME
#
# create_device_certificate writes, with NAME defaulting to "device":
#   DIR/private/NAME.key           the device key (openssl genrsa: PKCS#8 under OpenSSL 3)
#   DIR/certs/NAME.pem             the device certificate, subject CN=REGISTRATION_ID
#   DIR/certs/NAME-full-chain.pem  device + intermediate + root, in that order
# and DIR/certs/azure-iot-test-only.{root.ca,intermediate}.cert.pem come from
# create_root_and_intermediate.
#
# sign_device_csr issues DIR/certs/NAME.pem and NAME-full-chain.pem for a CSR made
# elsewhere (e.g. `dps-agent csr` for a key inside a token), as the guide's last
# step does for its own CSR.
#
# Environment (create_device_certificate, sign_device_csr):
#   DEVICE_KEY_TYPE=rsa|ec   rsa (default): openssl genrsa 2048; ec: openssl ecparam
#                            -name prime256v1 -genkey (SEC1, with the EC PARAMETERS block)
#   DEVICE_DAYS=N            validity in days (default 30, as in the guide)
#   DEVICE_EXPIRED=1         issue a certificate that expired long ago
set -euo pipefail

die() { echo "azure-guide-certs.sh: $*" >&2; exit 1; }

# Runs a command with its chatter (openssl's key generation dots) kept out of
# the way; shows it only when the command fails.
quiet() {
    local log rc=0
    log=$(mktemp)
    "$@" >"$log" 2>&1 || rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "azure-guide-certs.sh: failed: $*" >&2
        cat "$log" >&2
    fi
    rm -f "$log"
    return "$rc"
}

write_configs() {
    # The guide's openssl_root_ca.cnf, trimmed to what the commands below use.
    cat > openssl_root_ca.cnf <<'CNF'
[ ca ]
default_ca = CA_default

[ CA_default ]
dir               = .
certs             = $dir/certs
new_certs_dir     = $dir/newcerts
database          = $dir/index.txt
serial            = $dir/serial
private_key       = $dir/private/azure-iot-test-only.root.ca.key.pem
certificate       = $dir/certs/azure-iot-test-only.root.ca.cert.pem
default_md        = sha256
name_opt          = ca_default
cert_opt          = ca_default
default_days      = 3650
preserve          = no
policy            = policy_loose
unique_subject    = no
copy_extensions   = none

[ policy_loose ]
countryName             = optional
stateOrProvinceName     = optional
localityName            = optional
organizationName        = optional
organizationalUnitName  = optional
commonName              = supplied
emailAddress            = optional

[ req ]
default_bits        = 4096
distinguished_name  = req_distinguished_name
string_mask         = utf8only
default_md          = sha256
x509_extensions     = v3_ca

[ req_distinguished_name ]
commonName                      = Common Name

[ v3_ca ]
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always,issuer
basicConstraints = critical, CA:true
keyUsage = critical, digitalSignature, cRLSign, keyCertSign

[ v3_intermediate_ca ]
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always,issuer
basicConstraints = critical, CA:true, pathlen:0
keyUsage = critical, digitalSignature, cRLSign, keyCertSign
CNF
    # The guide's openssl_device_intermediate_ca.cnf: the intermediate issues
    # device certificates with usr_cert.
    sed -e 's|azure-iot-test-only.root.ca.key.pem|azure-iot-test-only.intermediate.key.pem|' \
        -e 's|azure-iot-test-only.root.ca.cert.pem|azure-iot-test-only.intermediate.cert.pem|' \
        -e 's|default_days      = 3650|default_days      = 30|' \
        openssl_root_ca.cnf > openssl_device_intermediate_ca.cnf
    cat >> openssl_device_intermediate_ca.cnf <<'CNF'

[ usr_cert ]
basicConstraints = CA:FALSE
nsCertType = client, email
nsComment = "OpenSSL Generated Client Certificate"
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid,issuer
keyUsage = critical, nonRepudiation, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
subjectAltName = DNS:${ENV::DEVICE_DNS_NAME}
CNF
}

create_root_and_intermediate() {
    mkdir -p certs csr newcerts private
    chmod 700 private
    : > index.txt
    openssl rand -hex 16 > serial
    write_configs
    export DEVICE_DNS_NAME=unused
    quiet openssl req -new -config ./openssl_root_ca.cnf -passout pass:1234 \
        -keyout ./private/azure-iot-test-only.root.ca.key.pem \
        -subj '/CN=Azure IoT Hub CA Cert Test Only' \
        -out ./csr/azure-iot-test-only.root.ca.csr.pem
    quiet openssl ca -batch -config ./openssl_root_ca.cnf -passin pass:1234 \
        -keyfile ./private/azure-iot-test-only.root.ca.key.pem \
        -subj '/CN=Azure IoT Hub CA Cert Test Only' -selfsign -extensions v3_ca \
        -in ./csr/azure-iot-test-only.root.ca.csr.pem \
        -out ./certs/azure-iot-test-only.root.ca.cert.pem
    quiet openssl req -new -config ./openssl_device_intermediate_ca.cnf -passout pass:1234 \
        -keyout ./private/azure-iot-test-only.intermediate.key.pem \
        -subj '/CN=Azure IoT Hub Intermediate Cert Test Only' \
        -out ./csr/azure-iot-test-only.intermediate.csr.pem
    quiet openssl ca -batch -config ./openssl_root_ca.cnf -passin pass:1234 \
        -keyfile ./private/azure-iot-test-only.root.ca.key.pem \
        -cert ./certs/azure-iot-test-only.root.ca.cert.pem \
        -extensions v3_intermediate_ca -days 30 -notext -md sha256 \
        -in ./csr/azure-iot-test-only.intermediate.csr.pem \
        -out ./certs/azure-iot-test-only.intermediate.cert.pem
}

create_device_certificate() {
    local reg_id=$1 name=$2
    [ -f certs/azure-iot-test-only.intermediate.cert.pem ] ||
        die "run create_root_and_intermediate first"
    export DEVICE_DNS_NAME=$reg_id
    case "${DEVICE_KEY_TYPE:-rsa}" in
        rsa) quiet openssl genrsa -out "./private/$name.key" 2048 ;;
        ec) quiet openssl ecparam -name prime256v1 -genkey -out "./private/$name.key" ;;
        *) die "DEVICE_KEY_TYPE must be rsa or ec" ;;
    esac
    chmod 600 "./private/$name.key"
    quiet openssl req -config ./openssl_device_intermediate_ca.cnf -key "./private/$name.key" \
        -subj "/CN=$reg_id" -new -sha256 -out "./csr/$name.csr.pem"
    sign_device_csr "./csr/$name.csr.pem" "$name"
}

sign_device_csr() {
    local csr=$1 name=$2
    [ -f certs/azure-iot-test-only.intermediate.cert.pem ] ||
        die "run create_root_and_intermediate first"
    # usr_cert's subjectAltName: the CSR's CN (the registration id).
    DEVICE_DNS_NAME=$(openssl req -in "$csr" -noout -subject -nameopt multiline |
        sed -n 's/^ *commonName *= *//p')
    [ -n "$DEVICE_DNS_NAME" ] || die "$csr has no CN"
    export DEVICE_DNS_NAME
    local validity=(-days "${DEVICE_DAYS:-30}")
    if [ "${DEVICE_EXPIRED:-0}" = 1 ]; then
        validity=(-startdate 20200101000000Z -enddate 20200201000000Z)
    fi
    quiet openssl ca -batch -config ./openssl_device_intermediate_ca.cnf -passin pass:1234 \
        -extensions usr_cert "${validity[@]}" -notext -md sha256 \
        -in "$csr" -out "./certs/$name.pem"
    cat "./certs/$name.pem" ./certs/azure-iot-test-only.intermediate.cert.pem \
        ./certs/azure-iot-test-only.root.ca.cert.pem > "./certs/$name-full-chain.pem"
}

command -v openssl >/dev/null || die "openssl is not installed (apt-get install openssl)"
case "${1:-}" in
    create_root_and_intermediate)
        [ $# -eq 2 ] || die "usage: $0 create_root_and_intermediate DIR"
        mkdir -p "$2" && cd "$2"
        create_root_and_intermediate
        ;;
    create_device_certificate)
        [ $# -ge 3 ] && [ $# -le 4 ] || die "usage: $0 create_device_certificate DIR REGISTRATION_ID [NAME]"
        cd "$2" 2>/dev/null || die "no directory $2"
        create_device_certificate "$3" "${4:-device}"
        ;;
    sign_device_csr)
        [ $# -eq 4 ] || die "usage: $0 sign_device_csr DIR CSR NAME"
        csr=$(cd "$(dirname "$3")" && pwd)/$(basename "$3")
        cd "$2" 2>/dev/null || die "no directory $2"
        sign_device_csr "$csr" "$4"
        ;;
    *)
        die "usage: $0 create_root_and_intermediate DIR | create_device_certificate DIR REGISTRATION_ID [NAME] | sign_device_csr DIR CSR NAME"
        ;;
esac
