"""Authoritative answers for the plan's zones (sans-IO, names are lower-case str).

RFC 1034 section 4.3.2 lookup with RFC 4592 wildcards: an existing name (or
empty non-terminal) is never overridden by a wildcard; NXDOMAIN and NODATA both
carry the zone's SOA for negative caching (RFC 2308).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from dnslib import NS, PTR, QTYPE, RR, SOA, SRV, A, DNSLabel

from appliance.plan import ARecord, DnsPlan, DnsZone, NsRecord, PtrRecord, SrvRecord
from services.dns.rcode import NOERROR, NXDOMAIN

T_A, T_NS, T_SOA, T_PTR, T_SRV, T_ANY = 1, 2, 6, 12, 33, 255


@dataclass(frozen=True, slots=True)
class Answer:
    rcode: int
    answer: tuple[RR, ...] = ()
    authority: tuple[RR, ...] = ()
    additional: tuple[RR, ...] = ()


@dataclass
class _Zone:
    origin: str
    soa: RR
    negative_soa: RR  # TTL = min(SOA TTL, minimum): RFC 2308 section 5
    names: dict[str, dict[int, list[RR]]] = field(default_factory=dict)
    nonterminals: set[str] = field(default_factory=set)


def _rr(record: ARecord | PtrRecord | SrvRecord | NsRecord, ttl: int) -> tuple[int, RR]:
    if isinstance(record, ARecord):
        return T_A, RR(record.name, QTYPE.A, rdata=A(str(record.address)), ttl=ttl)
    if isinstance(record, PtrRecord):
        return T_PTR, RR(record.name, QTYPE.PTR, rdata=PTR(record.target), ttl=ttl)
    if isinstance(record, SrvRecord):
        srv = SRV(record.priority, record.weight, record.port, record.target)
        return T_SRV, RR(record.name, QTYPE.SRV, rdata=srv, ttl=ttl)
    return T_NS, RR(record.name, QTYPE.NS, rdata=NS(record.target), ttl=ttl)


def _compile(zone: DnsZone, ttl: int) -> _Zone:
    s = zone.soa
    soa_rdata = SOA(s.mname, s.rname, (s.serial, s.refresh, s.retry, s.expire, s.minimum))
    soa = RR(zone.origin, QTYPE.SOA, rdata=soa_rdata, ttl=ttl)
    negative = RR(zone.origin, QTYPE.SOA, rdata=soa_rdata, ttl=min(ttl, s.minimum))
    out = _Zone(zone.origin, soa, negative)
    names: dict[str, dict[int, list[RR]]] = defaultdict(lambda: defaultdict(list))
    names[zone.origin][T_SOA].append(soa)
    for record in zone.records:
        rtype, rr = _rr(record, ttl)
        names[record.name][rtype].append(rr)
    out.names = {name: dict(types) for name, types in names.items()}
    # Every ancestor of an existing name (down to the apex) exists too, even if empty.
    suffix = "." + zone.origin
    for name in out.names:
        while name.endswith(suffix):
            name = name.split(".", 1)[1]
            if name not in out.names:
                out.nonterminals.add(name)
    return out


class Authority:
    """The cluster's zones, compiled once per plan."""

    def __init__(self, plan: DnsPlan) -> None:
        self.zones = sorted(
            (_compile(z, plan.ttl) for z in plan.zones), key=lambda z: -len(z.origin)
        )

    def zone_for(self, qname: str) -> _Zone | None:
        """The most specific zone holding qname, or None (not ours: forward or refuse)."""
        for zone in self.zones:
            if qname == zone.origin or qname.endswith("." + zone.origin):
                return zone
        return None

    def is_ours(self, qname: str) -> bool:
        return self.zone_for(qname) is not None

    def lookup(self, qname: str, qtype: int, owner: DNSLabel | None = None) -> Answer | None:
        """The answer for a lower-case name without trailing dot; None when not ours.

        `owner` is the name as the question spelled it on the wire; a wildcard answer
        is given that owner (default: qname).
        """
        zone = self.zone_for(qname)
        if zone is None:
            return None
        rrsets = zone.names.get(qname)
        if rrsets is not None:
            return self._from_rrsets(zone, qname, qtype, rrsets, synthesized=False)
        if qname in zone.nonterminals:
            return Answer(NOERROR, authority=(zone.negative_soa,))
        # Closest encloser: the longest existing ancestor; the wildcard hangs off it.
        encloser = qname
        while encloser != zone.origin:
            encloser = encloser.split(".", 1)[1]
            if encloser in zone.names or encloser in zone.nonterminals:
                break
        wild = zone.names.get("*." + encloser)
        if wild is not None:
            return self._from_rrsets(
                zone, qname if owner is None else owner, qtype, wild, synthesized=True
            )
        return Answer(NXDOMAIN, authority=(zone.negative_soa,))

    def _from_rrsets(
        self,
        zone: _Zone,
        qname: str | DNSLabel,
        qtype: int,
        rrsets: dict[int, list[RR]],
        *,
        synthesized: bool,
    ) -> Answer:
        if qtype == T_ANY:
            # RFC 8482: one RRset is enough; prefer the address.
            qtype = T_A if T_A in rrsets else next(iter(rrsets))
        rrs = rrsets.get(qtype)
        if not rrs:
            return Answer(NOERROR, authority=(zone.negative_soa,))
        if synthesized:
            rrs = [RR(qname, rr.rtype, rdata=rr.rdata, ttl=rr.ttl) for rr in rrs]
        additional: list[RR] = []
        if qtype in (T_SRV, T_NS):
            # Save the client a round trip: the targets' addresses.
            for rr in rrs:
                rdata = rr.rdata
                target = str(rdata.target if qtype == T_SRV else rdata.label).rstrip(".").lower()
                target_zone = self.zone_for(target)
                if target_zone is not None:
                    additional += target_zone.names.get(target, {}).get(T_A, [])
        return Answer(NOERROR, answer=tuple(rrs), additional=tuple(additional))
