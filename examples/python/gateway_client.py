#!/usr/bin/env python3
"""GetPerson from the population register through the consumer's security
server (the client port of MLSPP's server in `kopir demo --serve`), as the
benefits system, with mutual TLS and kopir's call metadata.

Prints `person ...` and `request-id ...` lines, or on refusal
`refused <gRPC code> <kopir-error reason>: <message>` and exits 1.
"""

import argparse
import sys

import kopir_stubs


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--addr", required=True, help="the consumer's client port, host:port (mlspp.client)")
    p.add_argument("--ca", required=True, help="CA certificate (ca)")
    p.add_argument("--cert", required=True, help="the benefits system's client certificate (client.cert)")
    p.add_argument("--key", required=True, help="its private key (client.key)")
    p.add_argument("--subject", required=True, help="the person's IIN, with or without 'iin:'")
    p.add_argument("--client", default="KZ/GOV/MLSPP/benefits", help="kopir-client (default %(default)s)")
    p.add_argument("--service", default="KZ/GOV/MOJ/population", help="kopir-service (default %(default)s)")
    p.add_argument("--purpose", default="child-benefit", help="kopir-purpose (default %(default)s, a legal act)")
    a = p.parse_args()

    import grpc

    [(pb, pb_grpc)] = kopir_stubs.load("kz/population/v1/population.proto")
    iin = a.subject.removeprefix("iin:")
    stub = pb_grpc.PopulationRegistryStub(kopir_stubs.channel(a.addr, a.ca, a.cert, a.key))
    metadata = [
        ("kopir-client", a.client),
        ("kopir-service", a.service),
        ("kopir-purpose", a.purpose),
        ("kopir-subject", f"iin:{iin}"),
    ]
    try:
        person, call = stub.GetPerson.with_call(pb.GetPersonRequest(iin=iin), metadata=metadata, timeout=10)
    except grpc.RpcError as e:
        code, reason, message = kopir_stubs.refusal(e)
        print(f"refused {code} {reason}: {message}")
        return 1
    print(f"person {person.iin} {person.surname} {person.given_name} {person.patronymic}, born {person.birth_date}")
    print(f"request-id {kopir_stubs.request_id(call)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
