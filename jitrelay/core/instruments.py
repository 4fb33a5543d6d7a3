"""Torq's instrument identity: venues, asset types and the ``asset_id`` of symbols.

Read from ``libs/types/src/protocol/identifiers/instrument/venues.rs``
(``VenueId``, ``AssetType``) and ``core.rs`` (``InstrumentId``,
``symbol_to_u64``, ``to_u64``) in dawsh2/Torq. A symbol's ``asset_id`` is its
first 8 bytes, big-endian, zero-filled (``symbol_to_u64``): ``"BTCUSD"`` is
``0x4254435553440000``; an EVM token's is the first 8 bytes of its address.
``InstrumentId.to_u64`` packs venue, asset type and the low 40 bits of the
asset id into one cache key.
"""

from __future__ import annotations

VENUES: dict[int, str] = {
    0: "Generic", 1: "NYSE", 2: "NASDAQ", 3: "LSE", 4: "TSE", 5: "HKEX",
    100: "Binance", 101: "Kraken", 102: "Coinbase", 103: "Huobi", 104: "OKEx", 105: "FTX", 106: "Bybit",
    107: "KuCoin", 108: "Gemini",
    200: "Ethereum", 201: "Bitcoin", 202: "Polygon", 203: "BinanceSmartChain", 204: "Avalanche", 205: "Fantom",
    206: "Arbitrum", 207: "Optimism", 208: "Solana", 209: "Cardano", 210: "Polkadot", 211: "Cosmos",
    300: "UniswapV2", 301: "UniswapV3", 302: "SushiSwap", 303: "Curve", 304: "Balancer", 305: "Aave",
    306: "Compound", 307: "MakerDAO", 308: "Yearn", 309: "Synthetix", 310: "DYdX",
    400: "QuickSwap", 401: "SushiSwapPolygon", 402: "CurvePolygon", 403: "AavePolygon", 404: "BalancerPolygon",
    500: "PancakeSwap", 501: "VenusProtocol",
    600: "UniswapV3Arbitrum", 601: "SushiSwapArbitrum", 602: "CurveArbitrum",
    700: "Deribit", 701: "BybitDerivatives", 702: "OpynProtocol", 703: "Hegic",
    800: "COMEX", 801: "CME", 802: "ICE", 803: "ForexCom",
    65000: "TestVenue", 65001: "MockExchange",
}  # fmt: skip

ASSET_TYPES: dict[int, str] = {
    1: "Stock", 2: "Bond", 3: "ETF", 4: "Commodity", 5: "Currency", 6: "Index",
    50: "Token", 51: "Coin", 52: "NFT", 53: "StableCoin", 54: "WrappedToken",
    100: "Pool", 101: "LPToken", 102: "YieldToken", 103: "SyntheticAsset", 104: "DerivativeToken",
    105: "GovernanceToken",
    150: "Option", 151: "Future", 152: "Swap", 153: "Forward", 154: "CDS",
    200: "StructuredNote", 201: "ConvertibleBond",
    250: "TestAsset", 251: "MockAsset",
}  # fmt: skip

SIDES = {0: "buy", 1: "sell"}  # TradeTLV.side, libs/types/src/protocol/tlv/market_data.rs

_VENUE_IDS = {name.lower(): number for number, name in VENUES.items()}
_ASSET_TYPE_IDS = {name.lower(): number for number, name in ASSET_TYPES.items()}


def venue_id(venue: int | str) -> int:
    """A venue's number from its name (``"Kraken"`` -> 101) or number; ``ValueError`` for one Torq does not name."""
    return _lookup(venue, _VENUE_IDS, VENUES, "venue")


def asset_type_id(asset_type: int | str) -> int:
    """An asset type's number from its name (``"Coin"`` -> 51) or number."""
    return _lookup(asset_type, _ASSET_TYPE_IDS, ASSET_TYPES, "asset type")


def _lookup(key: int | str, by_name: dict[str, int], names: dict[int, str], what: str) -> int:
    if isinstance(key, str):
        if key.lower() in by_name:
            return by_name[key.lower()]
        raise ValueError(f"Torq names no {what} {key!r}")
    if int(key) not in names:
        raise ValueError(f"Torq names no {what} number {key}")
    return int(key)


def symbol_asset_id(symbol: str) -> int:
    """A symbol's ``asset_id`` as Torq's ``symbol_to_u64`` makes it: its first 8 bytes, big-endian, zero-filled."""
    raw = symbol.encode()[:8]
    return int.from_bytes(raw.ljust(8, b"\0"), "big")


def asset_symbol(asset_id: int) -> str | None:
    """The symbol an ``asset_id`` spells (``symbol_asset_id`` reversed), or None when its bytes are not one."""
    raw = int(asset_id).to_bytes(8, "big").rstrip(b"\0")
    if not raw or b"\0" in raw or not all(0x21 <= b < 0x7F for b in raw):
        return None
    return raw.decode("ascii")


def evm_asset_id(address: str) -> int:
    """An EVM token's ``asset_id``: the first 8 bytes of its address, big-endian (``InstrumentId::evm_token``)."""
    digits = address.removeprefix("0x")
    if len(digits) != 40:
        raise ValueError(f"{address!r} is not a 20-byte hex address")
    return int(digits[:16], 16)


def instrument_key(venue: int, asset_type: int, asset_id: int) -> int:
    """``InstrumentId::to_u64``: venue in bits 48-63, asset type in 40-47, the asset id's low 40 bits below."""
    return (venue & 0xFFFF) << 48 | (asset_type & 0xFF) << 40 | (asset_id & 0xFF_FFFF_FFFF)


def instrument_from_key(key: int) -> tuple[int, int, int]:
    """``InstrumentId::from_u64``: (venue, asset type, asset id's low 40 bits) from a cache key."""
    return (key >> 48) & 0xFFFF, (key >> 40) & 0xFF, key & 0xFF_FFFF_FFFF
