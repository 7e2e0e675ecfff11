#!/usr/bin/env python3
"""A read that rests on the citizen's consent (purpose benefit-means-test):
the real-estate register's ListProperties through the consumer's security
server, first without a token (refused), then with one.

The consent is granted first as the portal does for the citizen (Grant, with
the portal's certificate), unless --consent-id names an existing one; the
benefits system then obtains the token (IssueToken, with its own client
certificate) and presents it in `kopir-consent`.

Prints `without-token refused <code> <reason>: ...`, `consent <id>`,
`token <first characters>...`, `property ...` lines and `request-id <id>`;
exits 1 if the read with the token fails or the one without is not refused.
"""

import argparse
import sys
import time

import kopir_stubs

METHOD = "/kz.realty.v1.RealtyRegistry/ListProperties"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--addr", required=True, help="the consumer's client port, host:port (mlspp.client)")
    p.add_argument("--consent", required=True, help="the consent authority, host:port (consent)")
    p.add_argument("--ca", required=True, help="CA certificate (ca)")
    p.add_argument("--cert", required=True, help="the benefits system's client certificate (client.cert)")
    p.add_argument("--key", required=True, help="its private key (client.key)")
    p.add_argument("--portal-cert", help="the portal's certificate, to grant the consent (portal.cert)")
    p.add_argument("--portal-key", help="its private key (portal.key)")
    p.add_argument("--consent-id", help="an existing consent instead of granting one")
    p.add_argument("--subject", required=True, help="the person's IIN, with or without 'iin:'")
    p.add_argument("--client", default="KZ/GOV/MLSPP/benefits", help="kopir-client (default %(default)s)")
    p.add_argument("--service", default="KZ/GOV/MOJ/realty", help="kopir-service (default %(default)s)")
    p.add_argument("--purpose", default="benefit-means-test", help="kopir-purpose (default %(default)s)")
    a = p.parse_args()
    if not a.consent_id and not (a.portal_cert and a.portal_key):
        p.error("give --consent-id, or --portal-cert and --portal-key to grant one")

    import grpc

    (c_pb, c_grpc), (r_pb, r_grpc) = kopir_stubs.load("kopir/v1/consent.proto", "kz/realty/v1/realty.proto")
    iin = a.subject.removeprefix("iin:")
    subject = f"iin:{iin}"
    metadata = [
        ("kopir-client", a.client),
        ("kopir-service", a.service),
        ("kopir-purpose", a.purpose),
        ("kopir-subject", subject),
    ]
    realty = r_grpc.RealtyRegistryStub(kopir_stubs.channel(a.addr, a.ca, a.cert, a.key))

    try:
        realty.ListProperties(r_pb.ListPropertiesRequest(iin=iin), metadata=metadata, timeout=10)
        print("without-token answered (expected a refusal)")
        return 1
    except grpc.RpcError as e:
        code, reason, message = kopir_stubs.refusal(e)
        print(f"without-token refused {code} {reason}: {message}")

    try:
        consent_id = a.consent_id
        if not consent_id:
            portal = c_grpc.ConsentServiceStub(kopir_stubs.channel(a.consent, a.ca, a.portal_cert, a.portal_key))
            consent_id = portal.Grant(
                c_pb.GrantRequest(
                    subject=subject,
                    client=a.client,
                    service=a.service,
                    methods=[METHOD],
                    purpose=a.purpose,
                    not_after=int(time.time()) + 3600,
                ),
                timeout=10,
            ).consent.id
        print(f"consent {consent_id}")
        system = c_grpc.ConsentServiceStub(kopir_stubs.channel(a.consent, a.ca, a.cert, a.key))
        token = system.IssueToken(c_pb.IssueTokenRequest(consent_id=consent_id), timeout=10).token
        print(f"token {token[:16]}...")
    except grpc.RpcError as e:
        code, reason, message = kopir_stubs.refusal(e)
        print(f"consent-authority refused {code} {reason}: {message}")
        return 1

    try:
        answer, call = realty.ListProperties.with_call(
            r_pb.ListPropertiesRequest(iin=iin), metadata=metadata + [("kopir-consent", token)], timeout=10
        )
    except grpc.RpcError as e:
        code, reason, message = kopir_stubs.refusal(e)
        print(f"with-token refused {code} {reason}: {message}")
        return 1
    print(f"properties {len(answer.properties)}")
    for prop in answer.properties:
        print(f"property {prop.cadastral_number} {prop.area_m2} m2 at {prop.address}")
    print(f"request-id {kopir_stubs.request_id(call)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
