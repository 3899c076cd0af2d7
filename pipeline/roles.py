"""Column roles: which column of a file is the user, the item, the time, the session, ...

A column plays a role because the user said so (`--column ROLE=NAME`) or because its name is one
the role is commonly given.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from pipeline.contract import SIDE_FEATURES
from pipeline.errors import InputError
from pipeline.reading import Table

# Column roles and the names they are commonly given, compared after lower-casing and
# dropping everything but letters and digits ("User ID" == "user_id" == "userid"); Chinese names
# as Tianchi's and Taobao's exports write them (用户ID = user id, 商品ID = item id, 时间戳 =
# timestamp, 行为类型 = behaviour type, 商品类目ID = the item's (leaf) category id, ...).
EVENT_ROLES: dict[str, tuple[str, ...]] = {
    "user": ("userid", "user", "uid", "visitorid", "customerid", "memberid", "buyerid", "reviewerid",
             "用户id", "用户", "会员id", "买家id", "访客id"),
    # parent_asin before asin: Amazon's 2023 reviews name the product by the first, a variant by the second
    "item": ("itemid", "item", "iid", "productid", "product", "sku", "skuid", "movieid",
             "articleid", "goodsid", "contentid", "parentasin", "asin", "businessid", "bookid", "trackid",
             "songid", "videoid", "newsid", "venueid", "locationid", "poiid", "courseid", "recipeid", "animeid",
             "商品id", "物品id", "宝贝id", "商品"),
    "time": ("timestamp", "time", "ts", "eventtime", "actiontime", "datetime", "date",
             "timestamps", "createdat", "eventtimestamp", "clicktime", "unixreviewtime", "dateadded", "utctimestamp", "checkintime",
             "时间戳", "时间", "行为时间", "操作时间", "日期"),
    "session": ("sessionid", "session", "usersession", "sid", "会话id", "会话"),
    "behavior": ("behavior", "behaviour", "behaviortype", "eventtype", "actiontype", "action",
                 "event", "type", "btag", "行为类型", "行为", "事件类型", "动作"),
    "leaf": ("leafcategory", "leafcategoryid", "leafcate", "leafcateid", "leaf", "leafid",
             "categoryid", "subcategory", "subcategoryid", "叶子类目id", "叶子类目", "商品类目id", "类目id"),
    "category": ("category", "cate", "cateid", "catid", "categorylevel1", "firstcategory",
                 "topcategory", "genre", "商品类别", "类别", "一级类目", "类目"),
    "shop": ("shop", "shopid", "sellerid", "seller", "storeid", "store", "merchantid", "merchant",
             "店铺", "店铺id", "商家", "商家id", "卖家id"),
    "brand": ("brand", "brandid", "brandname", "品牌", "品牌id"),
}
REQUIRED_ROLES = ("user", "item", "time")
OPTIONAL_EVENT_ROLES = ("session", "behavior", *SIDE_FEATURES)
ALL_ROLES = (*REQUIRED_ROLES, *OPTIONAL_EVENT_ROLES)


def normalise_name(name: str) -> str:
    """Lower case, letters and digits only: "User ID" == "user_id" == "userid", "用户ID" == "用户id"."""
    return re.sub(r"[\W_]", "", name.lower())


def find_column(
    columns: Sequence[str], role: str, explicit: Mapping[str, str], candidates: Sequence[str]
) -> str | None:
    """The column playing `role`: the one the user named, else the first common name present."""
    if role in explicit:
        return explicit[role] if explicit[role] in columns else None
    by_normalised = {normalise_name(name): name for name in columns}
    return next((by_normalised[name] for name in candidates if name in by_normalised), None)


def resolve_roles(table: Table, explicit: Mapping[str, str], roles: Sequence[str]) -> dict[str, str]:
    """Map each role in `roles` to a column of the table; required roles must be found."""
    path, columns = table.path, table.columns
    found: dict[str, str] = {}
    for role in roles:
        column = find_column(columns, role, explicit, EVENT_ROLES[role])
        if column is None and role in explicit:
            raise InputError(
                f"{path}: --column {role}={explicit[role]} names no column; "
                f"columns found: {', '.join(columns)}"
            )
        if column is not None and column not in found.values():
            found[role] = column
    if "user" not in found and "session" in found:
        # A session-based log (YOOCHOOSE, Diginetica) has no users: each session is its own user,
        # with no earlier sessions, so no long-term sets; pipeline/events.py tells the user so.
        found["user"] = found["session"]
    missing = [role for role in REQUIRED_ROLES if role in roles and role not in found]
    if missing:
        hint = "set it with --column ROLE=NAME"
        if not any(normalise_name(c) in EVENT_ROLES["user"] + EVENT_ROLES["item"] for c in columns):
            hint += " (if the file has no header, pass --no-header --columns a,b,c)"
        elif "user" in missing:
            hint += " (a log of anonymous sessions: name its session column, --column session=NAME)"
        raise InputError(
            f"{path}: missing required column{'s' if len(missing) > 1 else ''} "
            f"{', '.join(missing)}; columns found: {', '.join(columns)}; {hint}"
        )
    return found
