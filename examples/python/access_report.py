#!/usr/bin/env python3
"""The citizen's access report as the portal reads it: AccessReport.Report on
each provider's security server (its peer port), with the portal's TLS
certificate and a short-lived assertion naming the citizen, signed (EdDSA)
with the portal's signing key.

Prints `entry <time> <reader> read <method> of <service> for <purpose> under
<basis> query <id>` per read and `server <name> <n> entries` per server; exits
1 if a server refuses.
"""

import argparse
import base64
import hashlib
import json
import sys
import time
import uuid

import kopir_stubs

# Ed25519 signing (RFC 8032), in plain Python so that no extra package is needed.
P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493
D = -121665 * pow(121666, P - 2, P) % P
GY = 4 * pow(5, P - 2, P) % P
GX_SQ = (GY * GY - 1) * pow(D * GY * GY + 1, P - 2, P) % P
GX = pow(GX_SQ, (P + 3) // 8, P)
if (GX * GX - GX_SQ) % P:
    GX = GX * pow(2, (P - 1) // 4, P) % P
if GX & 1:
    GX = P - GX
G = (GX, GY, 1, GX * GY % P)


def add(a, b):
    x1, y1, z1, t1 = a
    x2, y2, z2, t2 = b
    A = (y1 - x1) * (y2 - x2) % P
    B = (y1 + x1) * (y2 + x2) % P
    C = 2 * t1 * t2 * D % P
    Dd = 2 * z1 * z2 % P
    E, F, Gg, H = B - A, Dd - C, Dd + C, B + A
    return (E * F % P, Gg * H % P, F * Gg % P, E * H % P)


def mul(s, pt):
    q = (0, 1, 1, 0)
    while s:
        if s & 1:
            q = add(q, pt)
        pt = add(pt, pt)
        s >>= 1
    return q


def encode(pt):
    x, y, z, _ = pt
    zi = pow(z, P - 2, P)
    x, y = x * zi % P, y * zi % P
    return int.to_bytes(y | ((x & 1) << 255), 32, "little")


def ed25519_sign(seed, msg):
    h = hashlib.sha512(seed).digest()
    a = int.from_bytes(h[:32], "little")
    a &= (1 << 254) - 8
    a |= 1 << 254
    pub = encode(mul(a, G))
    r = int.from_bytes(hashlib.sha512(h[32:] + msg).digest(), "little") % L
    R = encode(mul(r, G))
    k = int.from_bytes(hashlib.sha512(R + pub + msg).digest(), "little") % L
    return R + int.to_bytes((r + k * a) % L, 32, "little")


def pem_der(path):
    text = kopir_stubs.read(path).decode()
    body = "".join(l for l in text.splitlines() if l and not l.startswith("-----"))
    return base64.b64decode(body)


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def assertion(portal, subject, cert, key, lifetime=60):
    """A compact JWS (typ kopir-report+jwt) naming `subject`, signed with the
    portal's Ed25519 key (PKCS#8 PEM); kid is the SHA-256 of its certificate."""
    der = pem_der(key)
    marker = der.find(b"\x04\x20")
    seed = der[marker + 2 : marker + 34]
    kid = hashlib.sha256(pem_der(cert)).hexdigest()
    now = int(time.time())
    header = {"alg": "EdDSA", "typ": "kopir-report+jwt", "kid": kid}
    claims = {"iss": portal, "sub": subject, "aud": "kopir-access-report", "iat": now, "exp": now + lifetime, "jti": str(uuid.uuid4())}
    signing_input = b64(json.dumps(header, separators=(",", ":")).encode()) + "." + b64(json.dumps(claims, separators=(",", ":")).encode())
    return signing_input + "." + b64(ed25519_sign(seed, signing_input.encode()))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", action="append", required=True, help="a provider's peer port, host:port (moj.peer, src.peer); repeat")
    p.add_argument("--ca", required=True, help="CA certificate (ca)")
    p.add_argument("--cert", required=True, help="the portal's TLS certificate (portal.cert)")
    p.add_argument("--key", required=True, help="its private key (portal.key)")
    p.add_argument("--signing-cert", required=True, help="the portal's signing certificate (portal.signing.cert)")
    p.add_argument("--signing-key", required=True, help="its private key (portal.signing.key)")
    p.add_argument("--portal", default="portal", help="the portal's name in the global configuration (default %(default)s)")
    p.add_argument("--subject", required=True, help="the citizen's IIN, with or without 'iin:'")
    a = p.parse_args()

    import grpc

    [(pb, pb_grpc)] = kopir_stubs.load("kopir/v1/report.proto")
    subject = "iin:" + a.subject.removeprefix("iin:")
    failed = False
    for addr in a.server:
        stub = pb_grpc.AccessReportStub(kopir_stubs.channel(addr, a.ca, a.cert, a.key))
        request = pb.ReportRequest(subject=subject, assertion=assertion(a.portal, subject, a.signing_cert, a.signing_key))
        try:
            report = stub.Report(request, timeout=10)
        except grpc.RpcError as e:
            code, reason, message = kopir_stubs.refusal(e)
            print(f"server {addr} refused {code} {reason}: {message}")
            failed = True
            continue
        for e in report.entries:
            at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(e.at_ms / 1000))
            basis = f"law {e.legal_act}" if e.HasField("legal_act") else f"consent {e.consent_id}" if e.HasField("consent_id") else "-"
            method = e.method.rsplit("/", 1)[-1]
            print(f"entry {at} {e.consumer_subsystem} read {method} of {e.provider_service} for {e.purpose} under {basis} query {e.query_id}")
        print(f"server {report.server} {len(report.entries)} entries")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
