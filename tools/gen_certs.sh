#!/usr/bin/env bash
# Generate a self-signed CA, a server and a client certificate for local KVS use (idempotent).
#
#   tools/gen_certs.sh [DIR]          # default DIR: ./run/tls
#
# Writes into DIR (created with mode 0700):
#   ca.pem      CA certificate (public: give it to clients as --tls-ca / KVS_TLS_CA)
#   ca.key      CA private key        (0600)
#   server.pem  certificate signed by the CA, SAN DNS:localhost + IP:127.0.0.1
#               (+ $KVS_CERT_SANS, e.g. "DNS:kvs.example,IP:10.0.0.5"), usable for
#               serverAuth and clientAuth: gRPC servers, the Mosquitto TLS listener,
#               and server-to-server (mutual TLS) repair calls
#   server.key  its private key       (0600)
#   client.pem  certificate for clients (CN $KVS_CLIENT_CN, default kvs-shell), usable
#               for clientAuth only: the shell's identity under mutual TLS, so that
#               no client is ever handed a server key
#   client.key  its private key       (0600)
#
# Run again: nothing changes while the files exist, the certificate verifies
# against the CA, covers the requested SANs and is valid for at least another day;
# otherwise what is missing/expired is regenerated (the CA is kept if it is still good).
# Keys are ECDSA P-256. Needs the `openssl` command line tool.
set -euo pipefail
umask 077

DIR="${1:-./run/tls}"
DAYS_CA="${KVS_CERT_CA_DAYS:-3650}"
DAYS="${KVS_CERT_DAYS:-825}"
CLIENT_CN="${KVS_CLIENT_CN:-kvs-shell}"
SANS="DNS:localhost,IP:127.0.0.1${KVS_CERT_SANS:+,$KVS_CERT_SANS}"

command -v openssl >/dev/null 2>&1 || { echo "gen_certs.sh: openssl not found (apt-get install openssl)" >&2; exit 1; }
mkdir -p "$DIR"
chmod 700 "$DIR"
cd "$DIR"

valid_for_a_day() { openssl x509 -in "$1" -noout -checkend 86400 >/dev/null 2>&1; }

# ---- CA ---------------------------------------------------------------------
if [ -s ca.key ] && [ -s ca.pem ] && valid_for_a_day ca.pem \
   && [ "$(openssl pkey -in ca.key -pubout 2>/dev/null)" = "$(openssl x509 -in ca.pem -noout -pubkey 2>/dev/null)" ]; then
    ca_new=0
else
    openssl ecparam -name prime256v1 -genkey -noout -out ca.key.tmp
    openssl req -x509 -new -sha256 -key ca.key.tmp -days "$DAYS_CA" \
        -subj "/CN=KVS local CA $(date -u +%Y%m%dT%H%M%SZ)" \
        -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -addext "subjectKeyIdentifier=hash" \
        -out ca.pem.tmp 2>/dev/null
    mv -f ca.key.tmp ca.key
    mv -f ca.pem.tmp ca.pem
    ca_new=1
fi

# ---- server / peer certificate ---------------------------------------------
has_sans() {
    local text
    text="$(openssl x509 -in server.pem -noout -ext subjectAltName 2>/dev/null | tr -d ' \n')"
    local want
    for want in ${SANS//,/ }; do
        want="${want/IP:/IPAddress:}"
        case "$text" in *"$want"*) ;; *) return 1 ;; esac
    done
}
# issue NAME SUBJECT EXTENDED_KEY_USAGE EXTRA_EXT: NAME.key + NAME.pem signed by the CA
issue() {
    local name=$1 subject=$2 eku=$3 extra=$4
    openssl ecparam -name prime256v1 -genkey -noout -out "$name.key.tmp"
    openssl req -new -sha256 -key "$name.key.tmp" -subj "$subject" -out "$name.csr.tmp"
    {
        echo "basicConstraints=critical,CA:FALSE"
        echo "keyUsage=critical,digitalSignature,keyEncipherment,keyAgreement"
        echo "extendedKeyUsage=$eku"
        [ -n "$extra" ] && echo "$extra"
        echo "subjectKeyIdentifier=hash"
        echo "authorityKeyIdentifier=keyid"
    } > "$name.ext.tmp"
    openssl x509 -req -sha256 -in "$name.csr.tmp" -CA ca.pem -CAkey ca.key \
        -set_serial "0x$(openssl rand -hex 16)" -days "$DAYS" -extfile "$name.ext.tmp" \
        -out "$name.pem.tmp" 2>/dev/null
    rm -f "$name.csr.tmp" "$name.ext.tmp"
    mv -f "$name.key.tmp" "$name.key"
    mv -f "$name.pem.tmp" "$name.pem"
}

if [ "$ca_new" = 0 ] && [ -s server.key ] && [ -s server.pem ] && valid_for_a_day server.pem \
   && openssl verify -CAfile ca.pem server.pem >/dev/null 2>&1 && has_sans \
   && [ "$(openssl pkey -in server.key -pubout 2>/dev/null)" = "$(openssl x509 -in server.pem -noout -pubkey 2>/dev/null)" ]; then
    echo "gen_certs.sh: server certificate in $DIR is up to date" >&2
else
    issue server "/CN=localhost" "serverAuth,clientAuth" "subjectAltName=$SANS"
    echo "gen_certs.sh: wrote CA and server certificate ($SANS) to $DIR" >&2
fi

# ---- client certificate (clientAuth only) -----------------------------------
has_cn() { openssl x509 -in client.pem -noout -subject 2>/dev/null | grep -q "CN *= *$CLIENT_CN\$"; }
if [ "$ca_new" = 0 ] && [ -s client.key ] && [ -s client.pem ] && valid_for_a_day client.pem \
   && openssl verify -CAfile ca.pem client.pem >/dev/null 2>&1 && has_cn \
   && [ "$(openssl pkey -in client.key -pubout 2>/dev/null)" = "$(openssl x509 -in client.pem -noout -pubkey 2>/dev/null)" ]; then
    echo "gen_certs.sh: client certificate in $DIR is up to date" >&2
else
    issue client "/CN=$CLIENT_CN" "clientAuth" ""
    echo "gen_certs.sh: wrote client certificate (CN $CLIENT_CN) to $DIR" >&2
fi
chmod 600 ca.key server.key client.key
chmod 644 ca.pem server.pem client.pem
