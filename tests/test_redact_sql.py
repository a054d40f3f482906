"""The statement form written to the events log: comments, literals of every kind and labels the
client made up are gone; keywords, operators, $n and catalog names stay."""

# ruff: noqa: S608  # statements are built from made-up PHI on purpose

from __future__ import annotations

import pytest

from phigate.audit.redact_sql import NAME, catalog_names, redact_sql, unparsable
from phigate.policy.analyze import analyze

SURNAME = "Quorbin"  # a made-up surname standing for PHI a client wrote into a statement


def redacted(sql: str) -> str:
    return redact_sql(sql, catalog_names(analyze(sql, schema="public")))


@pytest.mark.parametrize(
    "literal",
    [
        f"'{SURNAME}'",
        f"'it''s {SURNAME}'",
        f"E'{SURNAME}\\'s'",
        f"e'\\x51{SURNAME}'",
        f"U&'\\0051{SURNAME}'",
        f"U&'!0051{SURNAME}' UESCAPE '!'",
        f"$${SURNAME}$$",
        f"$tag${SURNAME} $$ {SURNAME}$tag$",
        f"$_x1${SURNAME}$_x1$",
        "B'1011001'",
        "X'51756f7262696e'",
        "984961001",
        "9849610.01",
        "9.8e10",
        "0x3AB4",
        f"'{SURNAME}' '{SURNAME}'",  # adjacent string constants on separate lines join
    ],
)
def test_every_literal_kind_is_replaced(literal: str) -> None:
    literal = literal.replace("' '", "'\n'")
    sql = f"SELECT first_name FROM patients WHERE last_name = {literal}"
    out = redacted(sql)
    assert out.startswith("SELECT first_name FROM patients WHERE last_name = $1")
    for leak in (SURNAME, "51756f", "1011001", "98496", "3AB4", "9.8"):
        assert leak not in out


@pytest.mark.parametrize(
    "comment",
    [
        f"/* patient {SURNAME} */",
        f"/* outer /* nested {SURNAME} */ still {SURNAME} */",
        f"-- {SURNAME}\n",
        f"/* a */ /* b {SURNAME} */ -- c {SURNAME}\n",
    ],
)
def test_comments_are_dropped(comment: str) -> None:
    out = redacted(f"{comment}SELECT mrn FROM patients {comment}WHERE id = $1 {comment}")
    assert out == "SELECT mrn FROM patients WHERE id = $1"


def test_labels_are_replaced_and_catalog_names_kept() -> None:
    sql = (
        f'SELECT p.first_name AS "{SURNAME} Zy", last_name {SURNAME.lower()}, count(*) AS n, '
        f'lower(city)::text FROM patients p GROUP BY 1, 2, 4 ORDER BY "{SURNAME} Zy"'
    )
    out = redacted(sql)
    assert SURNAME not in out and SURNAME.lower() not in out
    assert out == (
        f"SELECT {NAME}.first_name AS {NAME}, last_name {NAME}, count (*) AS {NAME}, "
        f"lower (city)::text FROM patients {NAME} GROUP BY $1, $2, $3 ORDER BY {NAME}"
    )


def test_a_label_that_repeats_a_column_name_is_still_a_label() -> None:
    # ORDER BY refers to the label as if it were a column; the analyzer records it as one.
    out = redacted(f"SELECT mrn AS {SURNAME.lower()} FROM patients ORDER BY {SURNAME.lower()}")
    assert SURNAME.lower() not in out


def test_cte_names_and_quoted_identifiers_with_spaces_are_replaced() -> None:
    out = redacted(f'WITH "{SURNAME} list" AS (SELECT 1) SELECT * FROM "{SURNAME} list"')
    assert SURNAME not in out and out.count(NAME) == 2


def test_parameters_keep_their_numbers_and_literals_come_after_them() -> None:
    out = redacted("SELECT mrn FROM patients WHERE id = $2 AND last_name = 'x' LIMIT 10")
    assert out == "SELECT mrn FROM patients WHERE id = $2 AND last_name = $3 LIMIT $4"


def test_a_column_the_catalog_knows_is_not_there_is_not_logged() -> None:
    from phigate.masking.classification import CatalogSnapshot, ColumnInfo, RelationInfo

    col = ColumnInfo(name="mrn", attnum=1, type_oid=25, type_name="text", typmod=-1,
                     not_null=False, rule=None)  # fmt: skip
    rel = RelationInfo(oid=1, schema="public", name="patients", relkind="r", origin="configured",
                       columns=(col,))  # fmt: skip
    snap = CatalogSnapshot.from_relations("ehr", 180000, [rel])
    sql = f"SELECT mrn, {SURNAME.lower()} FROM patients"
    out = redact_sql(sql, catalog_names(analyze(sql, schema="public"), snap))
    assert out == f"SELECT mrn, {NAME} FROM patients"


def test_without_names_only_keywords_operators_and_pg_catalog_names_remain() -> None:
    out = redact_sql(f"SELECT {SURNAME}(1) FROM {SURNAME.lower()} WHERE now() > $1")
    assert out == f"SELECT {NAME} ($2) FROM {NAME} WHERE now () > $1"


@pytest.mark.parametrize(
    "sql",
    [
        f"SELECT '{SURNAME}",
        f"SELECT $${SURNAME}",
        f"SELECT 1 /* {SURNAME}",
        f'SELECT "{SURNAME}',
        f"SELECT E'{SURNAME}\\'",
    ],
)
def test_text_the_lexer_rejects_is_logged_as_its_size_only(sql: str) -> None:
    assert redacted(sql) == unparsable(sql) == f"<unparsable statement, {len(sql)} bytes>"


def test_text_that_scans_but_does_not_parse_is_still_redacted() -> None:
    out = redacted(f"SELEC first_name FORM patients WHERE x = '{SURNAME}'")
    assert SURNAME not in out and "$1" in out
