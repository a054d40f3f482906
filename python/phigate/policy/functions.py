"""Which functions an agent may call: the curated default allow-list and what is never allowed.

Names here are pg_catalog functions by bare name. An unqualified call resolves like the server
resolves it with the pinned search_path: to pg_catalog if such a function exists there (see
catalog.py), else to the target's one schema (`params.search_path`, default public). Calls are
judged in this order:

1. never: refused whatever the role says (SQL-string executors, files, large objects,
   admin and replication functions, other sessions' activity) -- see never_reason();
2. class functions: allowed when the role opens the class (pg_notify: "notify", advisory
   locks: "lock", the catalog inspection functions psql and JDBC metadata use: "catalog");
3. set_config(): only with a literal setting name that SET may change too (asyncpg turns jit
   off around its type introspection this way);
4. DEFAULT_FUNCTIONS for everybody, plus the role's own `functions` (schema-qualified).
"""

from __future__ import annotations

__all__ = [
    "CATALOG_FUNCTIONS",
    "CLASS_FUNCTIONS",
    "DEFAULT_FUNCTIONS",
    "NAME_ARGUMENT_FUNCTIONS",
    "WRITING_FUNCTIONS",
    "never_reason",
]


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


_STRING = _names("""
    ascii bit_length btrim casefold char_length character_length chr concat concat_ws
    convert_from convert_to crc32 crc32c decode encode format initcap left length like_escape
    lower lpad ltrim md5 normalize is_normalized octet_length overlay position quote_ident
    quote_literal quote_nullable regexp_count regexp_instr regexp_like regexp_match
    regexp_matches regexp_replace regexp_split_to_array regexp_split_to_table regexp_substr
    repeat replace reverse right rpad rtrim sha224 sha256 sha384 sha512 similar_to_escape
    split_part starts_with string_to_array string_to_table strpos substr substring text
    to_ascii to_bin to_hex to_oct translate unistr upper get_bit get_byte set_bit set_byte
    bit_count gen_random_uuid uuidv4 uuidv7 uuid_extract_timestamp uuid_extract_version
    varchar bpchar name char
""")
_NUMERIC = _names("""
    abs acos acosd acosh asin asind asinh atan atan2 atan2d atand atanh cbrt ceil ceiling cos
    cosd cosh cot cotd degrees div erf erfc exp factorial floor gamma gcd lgamma lcm ln log
    log10 min_scale mod pi power pow radians random random_normal round scale sign sin sind
    sinh sqrt tan tand tanh trim_scale trunc width_bucket numeric int2 int4 int8 float4 float8
    bool to_number to_char num_nulls num_nonnulls
""")
_DATETIME = _names("""
    age clock_timestamp date_add date_bin date_part date_subtract date_trunc extract isfinite
    justify_days justify_hours justify_interval make_date make_interval make_time
    make_timestamp make_timestamptz now statement_timestamp timeofday transaction_timestamp
    to_date to_timestamp timezone overlaps date time timetz timestamp timestamptz interval
    generate_series
""")
_AGGREGATE = _names("""
    array_agg avg bit_and bit_or bit_xor bool_and bool_or count every json_agg json_agg_strict
    json_object_agg json_object_agg_strict json_object_agg_unique json_object_agg_unique_strict
    jsonb_agg jsonb_agg_strict jsonb_object_agg jsonb_object_agg_strict
    jsonb_object_agg_unique jsonb_object_agg_unique_strict max min range_agg
    range_intersect_agg string_agg sum xmlagg corr covar_pop covar_samp regr_avgx regr_avgy
    regr_count regr_intercept regr_r2 regr_slope regr_sxx regr_sxy regr_syy stddev
    stddev_pop stddev_samp variance var_pop var_samp mode percentile_cont percentile_disc
    any_value
""")
_WINDOW = _names("""
    row_number rank dense_rank percent_rank cume_dist ntile lag lead first_value last_value
    nth_value
""")
_JSON = _names("""
    to_json to_jsonb array_to_json row_to_json json_build_array json_build_object json_object
    jsonb_build_array jsonb_build_object jsonb_object json_array_elements
    json_array_elements_text jsonb_array_elements jsonb_array_elements_text json_array_length
    jsonb_array_length json_each json_each_text jsonb_each jsonb_each_text json_extract_path
    json_extract_path_text jsonb_extract_path jsonb_extract_path_text json_object_keys
    jsonb_object_keys json_populate_record json_populate_recordset jsonb_populate_record
    jsonb_populate_recordset jsonb_populate_record_valid json_to_record json_to_recordset
    jsonb_to_record jsonb_to_recordset json_strip_nulls jsonb_strip_nulls json_typeof
    jsonb_typeof jsonb_pretty jsonb_set jsonb_set_lax jsonb_insert jsonb_path_exists
    jsonb_path_match jsonb_path_query jsonb_path_query_array jsonb_path_query_first
    jsonb_path_exists_tz jsonb_path_match_tz jsonb_path_query_tz jsonb_path_query_array_tz
    jsonb_path_query_first_tz json jsonb
""")
_ARRAY_RANGE = _names("""
    array_append array_cat array_dims array_fill array_length array_lower array_ndims
    array_position array_positions array_prepend array_remove array_replace array_reverse
    array_sample array_shuffle array_sort array_to_string array_upper cardinality trim_array
    unnest lower_inc upper_inc lower_inf upper_inf isempty range_merge multirange int4range
    int8range numrange tsrange tstzrange daterange int4multirange int8multirange
    nummultirange tsmultirange tstzmultirange datemultirange
""")
_TEXT_SEARCH = _names("""
    to_tsvector to_tsquery plainto_tsquery phraseto_tsquery websearch_to_tsquery ts_rank
    ts_rank_cd ts_headline setweight strip tsvector_to_array array_to_tsvector numnode
    querytree ts_delete ts_filter
""")
_GEOMETRY_TYPES = _names("""
    point box circle line lseg path polygon area center diameter height width radius npoints
    isclosed isopen pclose popen bound_box diagonal slope inet cidr macaddr macaddr8 money uuid
    bit varbit
""")
_NETWORK_XML = _names("""
    host hostmask masklen netmask network family abbrev broadcast inet_merge inet_same_family
    set_masklen xpath xpath_exists xmlexists xml_is_well_formed xml_is_well_formed_document
    xml_is_well_formed_content xmlcomment xmltext
""")
# What drivers run on their own for every role: type lookups (psycopg TypeInfo, asyncpg
# introspection, pgjdbc TypeInfoCache and ResultSetMetaData), asyncpg's pool reset
# (pg_advisory_unlock_all releases only the session's own locks), harmless session facts.
_SESSION = _names("""
    current_setting current_schema current_schemas current_database version format_type
    pg_typeof to_regtype to_regtypemod pg_get_expr pg_size_pretty pg_size_bytes
    pg_backend_pid pg_listening_channels pg_collation_for system_user pg_client_encoding
    pg_advisory_unlock_all
""")

#: Allowed for every role (pg_catalog functions, by bare name).
DEFAULT_FUNCTIONS: frozenset[str] = (
    _STRING
    | _NUMERIC
    | _DATETIME
    | _AGGREGATE
    | _WINDOW
    | _JSON
    | _ARRAY_RANGE
    | _TEXT_SEARCH
    | _GEOMETRY_TYPES
    | _NETWORK_XML
    | _SESSION
)

#: Catalog inspection functions (psql's \d commands, JDBC DatabaseMetaData); allow = ["catalog"].
CATALOG_FUNCTIONS: frozenset[str] = _names("""
    pg_get_userbyid pg_get_indexdef pg_get_constraintdef pg_get_triggerdef pg_get_viewdef
    pg_get_ruledef pg_get_functiondef pg_get_function_arguments pg_get_function_result
    pg_get_function_identity_arguments pg_get_function_arg_default pg_get_function_sqlbody
    pg_get_statisticsobjdef pg_get_statisticsobjdef_columns pg_get_statisticsobjdef_expressions
    pg_get_partkeydef pg_get_partition_constraintdef pg_get_serial_sequence
    pg_get_replica_identity_index pg_get_keywords pg_get_publication_tables pg_get_acl
    pg_table_is_visible pg_type_is_visible pg_function_is_visible pg_operator_is_visible
    pg_opclass_is_visible pg_opfamily_is_visible pg_collation_is_visible
    pg_conversion_is_visible pg_statistics_obj_is_visible pg_ts_config_is_visible
    pg_ts_dict_is_visible pg_ts_parser_is_visible pg_ts_template_is_visible
    obj_description col_description shobj_description pg_encoding_to_char
    pg_char_to_encoding has_table_privilege has_column_privilege has_any_column_privilege
    has_schema_privilege has_database_privilege has_function_privilege
    has_sequence_privilege has_type_privilege has_language_privilege
    has_foreign_data_wrapper_privilege has_server_privilege has_tablespace_privilege
    has_parameter_privilege has_largeobject_privilege pg_has_role pg_relation_size
    pg_table_size pg_total_relation_size pg_indexes_size pg_database_size
    pg_tablespace_size pg_relation_is_publishable pg_describe_object pg_identify_object
    pg_identify_object_as_address pg_options_to_table pg_index_column_has_property
    pg_index_has_property pg_indexam_has_property pg_get_indexdef pg_tablespace_databases
    pg_column_is_updatable pg_relation_is_updatable pg_get_triggerdef pg_get_viewdef
    to_regclass to_regnamespace to_regproc to_regprocedure to_regrole to_regoper
    to_regoperator to_regcollation array_to_string pg_inheritance_column_names
    pg_partition_root pg_partition_tree pg_partition_ancestors pg_sequence_parameters
    pg_get_object_address pg_type_is_visible
""")

#: Functions whose calls belong to a statement class a role can open with `allow`.
CLASS_FUNCTIONS: dict[str, str] = {
    "pg_notify": "notify",
    **dict.fromkeys(
        (
            "pg_advisory_lock",
            "pg_advisory_lock_shared",
            "pg_advisory_unlock",
            "pg_advisory_unlock_shared",
            "pg_advisory_xact_lock",
            "pg_advisory_xact_lock_shared",
            "pg_try_advisory_lock",
            "pg_try_advisory_lock_shared",
            "pg_try_advisory_xact_lock",
            "pg_try_advisory_xact_lock_shared",
        ),
        "lock",
    ),  # fmt: skip
    **dict.fromkeys(CATALOG_FUNCTIONS, "catalog"),
}

#: Functions that change data (so a statement calling them "writes").
WRITING_FUNCTIONS: frozenset[str] = _names("nextval setval")

#: Functions that read a string argument as the name of an object or setting: a decision about
#: a call with a literal there may depend on its value, so such statements are cached exactly.
NAME_ARGUMENT_FUNCTIONS: frozenset[str] = _names("""
    current_setting set_config nextval currval setval to_regclass to_regtype to_regtypemod
    to_regproc to_regprocedure to_regnamespace to_regrole to_regoper to_regoperator
    to_regcollation pg_get_serial_sequence obj_description has_table_privilege
    has_column_privilege has_any_column_privilege has_schema_privilege has_database_privilege
    has_function_privilege has_sequence_privilege has_type_privilege pg_has_role
    pg_relation_size pg_table_size pg_total_relation_size pg_indexes_size
""")

# --- never ------------------------------------------------------------------------------------

_NEVER_EXACT: dict[str, str] = {
    **dict.fromkeys(
        _names("""
            query_to_xml query_to_xmlschema query_to_xml_and_xmlschema cursor_to_xml
            cursor_to_xmlschema table_to_xml table_to_xmlschema table_to_xml_and_xmlschema
            schema_to_xml schema_to_xmlschema schema_to_xml_and_xmlschema database_to_xml
            database_to_xmlschema database_to_xml_and_xmlschema ts_stat ts_rewrite connectby
            xpath_table
        """),
        "it runs SQL given as a string, which the gateway cannot check",
    ),
    **dict.fromkeys(
        _names("""
            pg_read_file pg_read_binary_file pg_stat_file pg_file_write pg_file_rename
            pg_file_unlink pg_file_sync pg_logdir_ls pg_current_logfile loread lowrite
            pg_relation_filepath pg_relation_filenode pg_tablespace_location
            pg_filenode_relation
        """),
        "it reads or writes server files",
    ),
    **dict.fromkeys(
        _names("""
            pg_terminate_backend pg_cancel_backend pg_reload_conf pg_rotate_logfile
            pg_rotate_logfile_old pg_promote pg_switch_wal pg_create_restore_point
            pg_backup_start pg_backup_stop pg_start_backup pg_stop_backup pg_wal_replay_pause
            pg_wal_replay_resume pg_log_backend_memory_contexts pg_import_system_collations
            pg_logical_emit_message pg_replication_origin_create pg_replication_origin_drop
            pg_sync_replication_slots pg_log_standby_snapshot pg_stat_get_activity
            pg_stat_get_backend_activity pg_stat_get_backend_pid pg_show_all_file_settings
            pg_hba_file_rules pg_ident_file_mappings pg_blocking_pids pg_safe_snapshot_blocking_pids
            pg_get_backend_memory_contexts pg_stat_statements pg_stat_statements_info
            pg_stat_statements_reset pg_lock_status pg_prepared_xact pg_get_shmem_allocations
            pg_drop_replication_slot pg_create_physical_replication_slot
            pg_create_logical_replication_slot pg_copy_physical_replication_slot
            pg_copy_logical_replication_slot pg_replication_slot_advance pg_clear_attribute_stats
            pg_restore_attribute_stats pg_clear_relation_stats pg_restore_relation_stats
            pg_set_attribute_stats pg_set_relation_stats pg_ls_dir
        """),
        "it is a server administration function",
    ),
}
_NEVER_PREFIX: tuple[tuple[str, str], ...] = (
    ("dblink", "it opens connections to other databases"),
    ("crosstab", "it runs SQL given as a string, which the gateway cannot check"),
    ("lo_", "it works on large objects, which the gateway cannot check"),
    ("pg_ls_", "it lists server directories"),
    ("pg_stat_reset", "it is a server administration function"),
    ("pg_logical_slot_", "it reads the write-ahead log of every table"),
    ("pg_replication_origin_", "it is a server administration function"),
    ("postgres_fdw_", "it manages connections to other servers"),
)


def never_reason(name: str) -> str | None:
    """Why a function (bare name, any schema) is never allowed, or None if it may be."""
    reason = _NEVER_EXACT.get(name)
    if reason is not None:
        return reason
    for prefix, why in _NEVER_PREFIX:
        if name.startswith(prefix):
            return why
    return None
