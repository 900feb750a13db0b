"""Data-residency policy: every endpoint the sidecar talks to must lie in an allowed region.

Owns: the list of region ids that count as "inside the EU" by default, the
``on-prem-<country>`` form for the operator's own sites, and the pure check that a
set of declared endpoint regions satisfies a policy. No I/O: the configuration
declares regions (``cloud_sidecar.config``), this module judges them.

Invariants:
- a region is allowed only if it is in the policy's explicit set or is
  ``on-prem-<cc>`` with ``cc`` an allowed ISO 3166-1 alpha-2 code (lower case);
  nothing is inferred from a prefix such as ``eu-`` or ``europe-`` (``eu-west-2`` is
  London and ``europe-west6`` is Zurich: both outside the EU);
- ``check`` names the first offending endpoint and its region, in the order given,
  and raises ``ResidencyError`` (a ``ConfigError``: exit code 2);
- region ids are compared exactly (no case folding), at most ``MAX_REGION_LEN`` chars.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cloud_sidecar.errors import ResidencyError

log = logging.getLogger(__name__)

MAX_REGION_LEN = 64

# EU-27 member states, ISO 3166-1 alpha-2 (lower case; Greece is "gr", not "el").
EU_COUNTRIES: frozenset[str] = frozenset(
    [
        "at",
        "be",
        "bg",
        "hr",
        "cy",
        "cz",
        "dk",
        "ee",
        "fi",
        "fr",
        "de",
        "gr",
        "hu",
        "ie",
        "it",
        "lv",
        "lt",
        "lu",
        "mt",
        "nl",
        "pl",
        "pt",
        "ro",
        "sk",
        "si",
        "es",
        "se",
    ]
)

# Public-cloud regions whose data centres are in an EU member state. Deliberately
# absent: eu-west-2 / europe-west2 / uksouth (UK), eu-central-2 / europe-west6 /
# switzerlandnorth (CH), norwayeast (NO): European, but not EU jurisdiction.
EU_CLOUD_REGIONS: frozenset[str] = frozenset(
    {
        # AWS
        "eu-central-1",  # Frankfurt
        "eu-west-1",  # Ireland
        "eu-west-3",  # Paris
        "eu-north-1",  # Stockholm
        "eu-south-1",  # Milan
        "eu-south-2",  # Spain
        # Google Cloud
        "europe-west1",  # Belgium
        "europe-west3",  # Frankfurt
        "europe-west4",  # Netherlands
        "europe-west8",  # Milan
        "europe-west9",  # Paris
        "europe-west10",  # Berlin
        "europe-west12",  # Turin
        "europe-north1",  # Finland
        "europe-central2",  # Warsaw
        "europe-southwest1",  # Madrid
        # Azure
        "westeurope",  # Netherlands
        "northeurope",  # Ireland
        "germanywestcentral",
        "francecentral",
        "swedencentral",
        "italynorth",
        "polandcentral",
        "spaincentral",
        # European providers
        "fr-par",  # Scaleway Paris
        "nl-ams",  # Scaleway Amsterdam
        "pl-waw",  # Scaleway Warsaw
        "ovh-gra",  # OVHcloud Gravelines
        "ovh-sbg",  # OVHcloud Strasbourg
        "ovh-waw",  # OVHcloud Warsaw
        "hetzner-fsn1",  # Falkenstein
        "hetzner-nbg1",  # Nuremberg
        "hetzner-hel1",  # Helsinki
    }
)

_ON_PREM = re.compile(r"on-prem-([a-z]{2})(?:-[a-z0-9]{1,20})?")


@dataclass(frozen=True)
class ResidencyPolicy:
    """Which regions data may live in or pass through."""

    regions: frozenset[str] = EU_CLOUD_REGIONS
    on_prem_countries: frozenset[str] = EU_COUNTRIES

    @classmethod
    def eu_default(cls) -> ResidencyPolicy:
        return cls()

    @classmethod
    def only(cls, allowed: Iterable[str]) -> ResidencyPolicy:
        """Exactly ``allowed`` (cloud regions and/or ``on-prem-<cc>`` ids), nothing else."""
        regions, countries = set(), set()
        for region in allowed:
            m = _ON_PREM.fullmatch(region)
            if m is not None and region == f"on-prem-{m.group(1)}":
                countries.add(m.group(1))
            else:
                regions.add(region)
        return cls(frozenset(regions), frozenset(countries))

    def allows(self, region: str) -> bool:
        if not region or len(region) > MAX_REGION_LEN:
            return False
        if region in self.regions:
            return True
        m = _ON_PREM.fullmatch(region)
        return m is not None and m.group(1) in self.on_prem_countries

    def check(self, endpoints: Mapping[str, str]) -> None:
        """Raise ``ResidencyError`` naming the first endpoint whose region is not allowed."""
        for name, region in endpoints.items():
            if not self.allows(region):
                raise ResidencyError(
                    f"residency: endpoint {name!r} declares region {region[:MAX_REGION_LEN]!r},"
                    " which is outside the allowed set (EU regions and on-prem-<EU country>"
                    " by default; see residency.allowed_regions)",
                    endpoint=name,
                    region=region[:MAX_REGION_LEN],
                )
        log.debug("residency: %d endpoints inside the allowed set", len(endpoints))
