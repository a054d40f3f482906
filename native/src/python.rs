//! The #[pymodule] `phigate._native`: exports Engine and Request to the control plane. Only this
//! file knows PyO3; it converts JSON values at the boundary, once per request, never per row.

use parking_lot::Mutex;
use pyo3::exceptions::{PyKeyError, PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyList, PyInt, PyString, PyTuple};
use serde_json::Value;
use std::time::Duration;
use tokio::sync::oneshot;

use crate::bridge::PendingRequest;
use crate::masking::dictionary::{DictionaryBuilder as CoreBuilder, Kind};
use crate::runtime::{Engine as CoreEngine, NewError};

pyo3::create_exception!(_native, AuditError, PyRuntimeError, "The audit trail cannot be opened or written; the message says what to fix.");

fn to_py(py: Python<'_>, v: &Value) -> PyResult<PyObject> {
    Ok(match v {
        Value::Null => py.None(),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any().unbind(),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                i.into_pyobject(py)?.into_any().unbind()
            } else if let Some(u) = n.as_u64() {
                u.into_pyobject(py)?.into_any().unbind()
            } else {
                PyFloat::new(py, n.as_f64().unwrap_or(0.0)).into_any().unbind()
            }
        }
        Value::String(s) => PyString::new(py, s).into_any().unbind(),
        Value::Array(a) => {
            let items = a.iter().map(|x| to_py(py, x)).collect::<PyResult<Vec<_>>>()?;
            PyList::new(py, items)?.into_any().unbind()
        }
        Value::Object(m) => {
            let d = PyDict::new(py);
            for (k, x) in m {
                d.set_item(k, to_py(py, x)?)?;
            }
            d.into_any().unbind()
        }
    })
}

fn from_py(o: &Bound<'_, PyAny>, depth: usize) -> PyResult<Value> {
    if depth > 32 {
        return Err(PyValueError::new_err("answer is nested too deeply"));
    }
    if o.is_none() {
        return Ok(Value::Null);
    }
    if let Ok(b) = o.downcast::<PyBool>() {
        return Ok(Value::Bool(b.is_true()));
    }
    if o.is_instance_of::<PyInt>() {
        return Ok(Value::from(o.extract::<i64>()?));
    }
    if let Ok(f) = o.downcast::<PyFloat>() {
        return Ok(serde_json::Number::from_f64(f.value()).map(Value::Number).unwrap_or(Value::Null));
    }
    if let Ok(s) = o.downcast::<PyString>() {
        return Ok(Value::String(s.to_str()?.to_string()));
    }
    if let Ok(d) = o.downcast::<PyDict>() {
        let mut m = serde_json::Map::new();
        for (k, v) in d.iter() {
            let k: String = k.extract().map_err(|_| PyValueError::new_err("answer keys must be strings"))?;
            m.insert(k, from_py(&v, depth + 1)?);
        }
        return Ok(Value::Object(m));
    }
    if o.is_instance_of::<PyList>() || o.is_instance_of::<PyTuple>() {
        let mut a = vec![];
        for x in o.try_iter()? {
            a.push(from_py(&x?, depth + 1)?);
        }
        return Ok(Value::Array(a));
    }
    Err(PyValueError::new_err(format!("unsupported value of type {} in answer", o.get_type().name()?)))
}

/// One question from the data plane; answer it exactly once with reply().
#[pyclass(module = "phigate._native")]
struct Request {
    #[pyo3(get)]
    id: u64,
    #[pyo3(get)]
    kind: &'static str,
    payload: Value,
    reply_tx: Mutex<Option<oneshot::Sender<Value>>>,
}

#[pymethods]
impl Request {
    #[getter]
    fn payload(&self, py: Python<'_>) -> PyResult<PyObject> {
        to_py(py, &self.payload)
    }

    /// Sends the answer; False if the data plane already gave up on this request.
    fn reply(&self, answer: &Bound<'_, PyAny>) -> PyResult<bool> {
        if !answer.is_instance_of::<PyDict>() {
            return Err(PyValueError::new_err("reply() takes a dict"));
        }
        let tx = self.reply_tx.lock().take().ok_or_else(|| PyRuntimeError::new_err("request already answered"))?;
        let value = match from_py(answer, 0) {
            Ok(v) => v,
            Err(e) => {
                // Dropping tx makes the data plane fail closed for this request.
                drop(tx);
                return Err(e);
            }
        };
        Ok(tx.send(value).is_ok())
    }

    fn __repr__(&self) -> String {
        format!("<Request {} {}>", self.id, self.kind)
    }
}

impl Request {
    fn from_pending(p: PendingRequest) -> Self {
        Request { id: p.id, kind: p.kind.as_str(), payload: p.payload, reply_tx: Mutex::new(Some(p.reply)) }
    }
}

/// Identifier values for one target's dictionary: each value is folded, hashed under the
/// process's dictionary key and forgotten. Engine.set_dictionary() takes its entries (once).
#[pyclass(module = "phigate._native")]
struct DictionaryBuilder {
    /// None once handed to Engine.set_dictionary().
    inner: Option<CoreBuilder>,
}

impl DictionaryBuilder {
    fn spent() -> PyErr {
        PyRuntimeError::new_err("this DictionaryBuilder was already given to Engine.set_dictionary(); create a new one")
    }
}

#[pymethods]
impl DictionaryBuilder {
    #[new]
    #[pyo3(signature = (stop_words, min_chars = 2))]
    fn new(stop_words: Vec<String>, min_chars: usize) -> Self {
        DictionaryBuilder { inner: Some(CoreBuilder::new(stop_words.iter().map(String::as_str), min_chars)) }
    }

    /// Adds values of one PHI kind ("name", "address", "city", "zip", "mrn", "email", "phone",
    /// "ssn", "dob"; other kinds are tagged [PHI]); None is skipped. Returns the entries added.
    fn add(&mut self, kind: &str, values: &Bound<'_, PyAny>) -> PyResult<usize> {
        let b = self.inner.as_mut().ok_or_else(Self::spent)?;
        let kind = Kind::parse(kind);
        let mut added = 0;
        for v in values.try_iter()? {
            let v = v?;
            if v.is_none() {
                continue;
            }
            let s = v.downcast::<PyString>().map_err(|_| PyTypeError::new_err("DictionaryBuilder.add() takes str or None values"))?;
            added += b.add(kind, s.to_str()?);
        }
        Ok(added)
    }

    fn __len__(&self) -> usize {
        self.inner.as_ref().map_or(0, CoreBuilder::len)
    }
}

#[pyclass(module = "phigate._native")]
struct Engine {
    inner: CoreEngine,
}

#[pymethods]
impl Engine {
    #[new]
    fn new(config_json: &str) -> PyResult<Self> {
        match CoreEngine::new(config_json) {
            Ok(inner) => Ok(Engine { inner }),
            Err(NewError::Config(e)) => Err(PyValueError::new_err(e)),
            Err(NewError::Audit(e)) => Err(AuditError::new_err(e)),
        }
    }

    /// Appends a record made by the control plane (a JSON object; the writer makes it
    /// canonical). AuditError if the engine has no trail or it is closed.
    fn audit_append(&self, body: &[u8]) -> PyResult<()> {
        let trail = self.inner.trail().ok_or_else(|| AuditError::new_err("this engine has no audit trail (its config has no \"audit\" object)"))?;
        if trail.status().closed {
            return Err(AuditError::new_err("the audit trail is closed"));
        }
        trail.append(body);
        Ok(())
    }

    /// The trail's state: {"state": "ok"|"failing"|"closed", "reason", "detail", "seq",
    /// "checkpoint_size", "checkpoint_time", "pending", "lost", "bytes_written", "float_values",
    /// "bad_records", "publish_errors", "sync"}; None without a trail.
    fn audit_status<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let Some(trail) = self.inner.trail() else { return Ok(None) };
        let s = trail.status();
        let d = PyDict::new(py);
        let state = if s.closed { "closed" } else if s.failing.is_some() { "failing" } else { "ok" };
        d.set_item("state", state)?;
        d.set_item("reason", s.failing.as_ref().map(|f| f.0.clone()))?;
        d.set_item("detail", s.failing.as_ref().map(|f| f.1.clone()))?;
        d.set_item("seq", s.next_seq)?;
        d.set_item("checkpoint_size", s.checkpoint_size)?;
        d.set_item("checkpoint_time", (s.checkpoint_us > 0).then(|| crate::audit::time::format_us(s.checkpoint_us)))?;
        d.set_item("pending", s.pending)?;
        d.set_item("lost", s.lost)?;
        d.set_item("bytes_written", s.bytes_written)?;
        d.set_item("float_values", s.float_values)?;
        d.set_item("bad_records", s.bad_records)?;
        d.set_item("publish_errors", s.publish_errors)?;
        d.set_item("sync", trail.sync_mode().as_str())?;
        Ok(Some(d))
    }

    /// Closes the audit trail: audit_close, a final checkpoint, fsync. Call after shutdown()
    /// and after the last audit_append(); a second call does nothing.
    fn audit_close(&self, py: Python<'_>) {
        py.allow_threads(|| self.inner.close_trail());
    }

    fn start(&self, py: Python<'_>) -> PyResult<()> {
        py.allow_threads(|| self.inner.start()).map_err(|e| PyOSError::new_err(e.to_string()))
    }

    fn listen_addresses(&self) -> Vec<String> {
        self.inner.listen_addresses()
    }

    fn wakeup_fd(&self) -> i32 {
        self.inner.core.bridge.wakeup_fd()
    }

    fn take_requests(&self) -> Vec<Request> {
        self.inner.core.bridge.take_requests().into_iter().map(Request::from_pending).collect()
    }

    fn take_events<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        let ev = self.inner.core.bridge.take_events();
        PyBytes::new(py, &ev)
    }

    fn reconfigure(&self, config_json: &str) -> PyResult<u64> {
        self.inner.reconfigure(config_json).map_err(PyValueError::new_err)
    }

    /// Layer-2 masking state as JSON: {"pseudonym_key_hex", "mrn_pattern", "extra_patterns",
    /// "targets": {name: {"rules": [[table_oid, attnum, kind, mask]], "protected_oids": [...]}}}.
    fn set_masking(&self, state_json: &str) -> PyResult<()> {
        self.inner.set_masking(state_json).map_err(PyValueError::new_err)
    }

    /// Subject relations of `target` (accounting of disclosures): `relations` as
    /// [(table_oid, key_attnum, "schema.table", {attnum: column name})] resolved in its catalog,
    /// `names` every relation `[phi.subjects]` names (empty: none on this target).
    fn set_subjects(&self, target: &str, relations: Vec<(u32, i16, String, std::collections::HashMap<i16, String>)>, names: Vec<String>) -> PyResult<()> {
        let relations = relations
            .into_iter()
            .map(|(oid, key_attnum, name, columns)| crate::disclosures::SubjectRelation {
                oid,
                key_attnum,
                name: name.into(),
                columns: columns.into_iter().map(|(a, c)| (a, c.into())).collect(),
            })
            .collect();
        self.inner.set_subjects(target, relations, names).map_err(PyValueError::new_err)
    }

    /// A builder that starts from `target`'s dictionary (same key, stop words, entries);
    /// KeyError if the target has none.
    fn dictionary_builder(&self, target: &str) -> PyResult<DictionaryBuilder> {
        let b = self.inner.dictionary_builder(target).ok_or_else(|| PyKeyError::new_err(target.to_string()))?;
        Ok(DictionaryBuilder { inner: Some(b) })
    }

    /// Replaces `target`'s dictionary with the builder's entries (extend=True: adds them to the
    /// current one). Takes the builder.
    #[pyo3(signature = (target, builder, extend = false))]
    fn set_dictionary<'py>(&self, py: Python<'py>, target: &str, builder: &Bound<'py, DictionaryBuilder>, extend: bool) -> PyResult<Bound<'py, PyDict>> {
        let b = builder.borrow_mut().inner.take().ok_or_else(DictionaryBuilder::spent)?;
        let (entries, bytes) = py.allow_threads(|| self.inner.set_dictionary(target, b, extend)).map_err(PyValueError::new_err)?;
        let d = PyDict::new(py);
        d.set_item("entries", entries)?;
        d.set_item("bytes", bytes)?;
        Ok(d)
    }

    /// Removes `target`'s dictionary; False if it had none.
    fn drop_dictionary(&self, py: Python<'_>, target: &str) -> bool {
        // Merging the other targets' dictionaries again takes a while: not under the GIL.
        py.allow_threads(|| self.inner.drop_dictionary(target))
    }

    /// True when the content detectors or a dictionary find an identifier in `text`: the
    /// control plane keeps such names out of the statements it logs.
    fn text_has_phi(&self, py: Python<'_>, text: &str) -> bool {
        let masking = self.inner.core.masking();
        py.allow_threads(|| !masking.ctx.detectors.hits(text).is_empty())
    }

    fn bump_epoch(&self) -> u64 {
        self.inner.core.cache.bump_epoch()
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in self.inner.stats() {
            d.set_item(k, v)?;
        }
        let dictionaries = PyDict::new(py);
        for (target, entries, bytes) in self.inner.dictionary_stats() {
            let one = PyDict::new(py);
            one.set_item("entries", entries)?;
            one.set_item("bytes", bytes)?;
            dictionaries.set_item(target, one)?;
        }
        d.set_item("dictionary", dictionaries)?;
        d.set_item("dictionary_merged_bytes", self.inner.dictionary_merged_bytes())?;
        Ok(d)
    }

    fn shutdown(&self, py: Python<'_>, grace_seconds: f64) {
        let grace = Duration::from_secs_f64(grace_seconds.clamp(0.0, 86_400.0));
        py.allow_threads(|| self.inner.shutdown(grace));
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<Engine>()?;
    m.add_class::<DictionaryBuilder>()?;
    m.add_class::<Request>()?;
    m.add("AuditError", m.py().get_type::<AuditError>())?;
    Ok(())
}
