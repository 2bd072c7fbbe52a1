/*
 * ctxvars_mw._speedups: ContextMiddleware's http path in C.
 *
 * Optional. ctxvars_mw/middleware.py holds the reference implementation in Python and uses
 * this module only when it was built (and CTXVARS_MW_NO_EXTENSIONS is not set); the test
 * suite runs the middleware's tests against both. Everything here mirrors that Python code
 * step by step, and hands anything unusual back to it. Authentication stays in Python.
 *
 *   Accelerator.start(scope, send) -> Exchange | None
 *       None when the Python path must handle the request (a scope that is not a plain dict,
 *       headers that are not a list/tuple of (bytes, bytes) pairs, a nested middleware).
 *       Otherwise: scans the request headers, accepts or generates the request/correlation
 *       ids (short or odd ids go to the Python _accept_id) and returns the Exchange. For a
 *       middleware without an authenticator it also enters the request (below); with one,
 *       Exchange.authorization holds the Authorization header values for Python to check.
 *   Exchange.enter(identity, permissions, features)
 *       makes the request's frame [None, build, args, cleanups, headers] (see current.py)
 *       current: a nested middleware finds it there.
 *   Exchange(message)
 *       the app's send: sets the id headers on http.response.start (any header list it does
 *       not understand goes through the Python _with_ids), then calls the server's send.
 *   Exchange.finish()
 *       resets the ContextVar and closes the cleanup list: what the Python path's finally
 *       block does.
 *
 * No value from a request is ever logged or formatted here.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <string.h>
#include <time.h>

static inline int
bytes_equal(PyObject *a, const char *b, Py_ssize_t blen)
{
    return PyBytes_GET_SIZE(a) == blen && memcmp(PyBytes_AS_STRING(a), b, (size_t)blen) == 0;
}

static inline int
same_bytes(PyObject *a, PyObject *b)
{
    return a == b || bytes_equal(a, PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b));
}

/* The items of an exact list or tuple (borrowed, valid until Python code runs); 0 for
   anything else. */
static inline int
list_or_tuple_items(PyObject *seq, PyObject ***items, Py_ssize_t *n)
{
    if (PyList_CheckExact(seq)) {
        *items = ((PyListObject *)seq)->ob_item;
        *n = PyList_GET_SIZE(seq);
        return 1;
    }
    if (PyTuple_CheckExact(seq)) {
        *items = ((PyTupleObject *)seq)->ob_item;
        *n = PyTuple_GET_SIZE(seq);
        return 1;
    }
    return 0;
}

/* A (name, value) pair of bytes, from a tuple or a list of two; 0 when it is not one. */
static inline int
unpack_pair(PyObject *item, PyObject **name, PyObject **value)
{
    if (PyTuple_CheckExact(item) && PyTuple_GET_SIZE(item) == 2) {
        *name = PyTuple_GET_ITEM(item, 0);
        *value = PyTuple_GET_ITEM(item, 1);
    }
    else if (PyList_CheckExact(item) && PyList_GET_SIZE(item) == 2) {
        *name = PyList_GET_ITEM(item, 0);
        *value = PyList_GET_ITEM(item, 1);
    }
    else {
        return 0;
    }
    return PyBytes_CheckExact(*name) && PyBytes_CheckExact(*value);
}

/* ------------------------------------------------------------------------------------ */
/* The types                                                                              */

typedef struct {
    PyObject_HEAD
    PyObject *rid_in;      /* the request header names read (None: incoming ids ignored) */
    PyObject *cid_in;
    PyObject *rid;         /* the response header names */
    PyObject *cid;
    PyObject *names;       /* frozenset({rid, cid}) */
    PyObject *features;    /* the anonymous tier's features */
    PyObject *no_names;    /* the empty frozenset */
    PyObject *build;       /* middleware._request_context */
    PyObject *accept_id;   /* middleware._accept_id(raw, kind, rules) */
    PyObject *with_ids;    /* middleware._with_ids(headers, id_headers, names) */
    PyObject *generate_id; /* ids.generate_id */
    PyObject *now;         /* time.time */
    PyObject *rules_var;   /* ids._rules_var */
    PyObject *ids_module;  /* for ids._global_rules */
    PyObject *current;     /* current._current */
    PyObject *closed;      /* resources._closed */
    PyObject *last_rules;  /* the rules whose _safe_length is last_safe */
    Py_ssize_t last_safe;
    Py_ssize_t id_max;     /* ids.HEADER_ID_MAX */
    unsigned char id_char[256]; /* 1 for each byte of ids.HEADER_ID_CHARS */
    int authenticate;      /* collect Authorization headers and leave entering to Python */
} Accelerator;

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *acc;            /* the Accelerator (ACC(self)) */
    PyObject *send;           /* the server's send */
    PyObject *headers;        /* the request's header list (the frame's last slot) */
    PyObject *rid_value;      /* the id header values (bytes) */
    PyObject *cid_value;
    PyObject *request_id;     /* the ids: the accepted header bytes (decoded when the */
    PyObject *correlation_id; /* context is built), or a str */
    PyObject *trace;          /* the raw traceparent (bytes) or None */
    PyObject *authorization;  /* the Authorization header values (list), or NULL */
    PyObject *ctx;            /* once entered (NULL until then): the request's frame */
    PyObject *stack;          /* ... its cleanup list */
    PyObject *ctx_token;      /* ... and the ContextVar's token */
    char started;
    char finished;
} Exchange;

static PyTypeObject Exchange_Type;
static PyTypeObject Accelerator_Type;
#define ACC(exchange) ((Accelerator *)(exchange)->acc)

/* The object pointers of a struct from field `first` to field `last`, which are declared
   one after another (tp_traverse and tp_clear walk them). */
#define OBJECT_FIELDS(type, first, last)                                                      \
    (PyObject **)((char *)self + offsetof(type, first)),                                      \
        (Py_ssize_t)((offsetof(type, last) - offsetof(type, first)) / sizeof(PyObject *) + 1)

static int
visit_fields(PyObject **fields, Py_ssize_t n, visitproc visit, void *arg)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_VISIT(fields[i]);
    }
    return 0;
}

static void
clear_fields(PyObject **fields, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_CLEAR(fields[i]);
    }
}

/* tp_traverse, tp_clear and tp_dealloc of a GC type whose object fields are first..last. */
#define GC_FUNCTIONS(type, first, last)                                                       \
    static int type##_traverse(type *self, visitproc visit, void *arg)                         \
    {                                                                                         \
        return visit_fields(OBJECT_FIELDS(type, first, last), visit, arg);                    \
    }                                                                                         \
    static int type##_clear(type *self)                                                       \
    {                                                                                         \
        clear_fields(OBJECT_FIELDS(type, first, last));                                       \
        return 0;                                                                             \
    }                                                                                         \
    static void type##_dealloc(type *self)                                                    \
    {                                                                                         \
        PyObject_GC_UnTrack(self);                                                            \
        type##_clear(self);                                                                   \
        Py_TYPE(self)->tp_free((PyObject *)self);                                             \
    }
static PyObject *str_type, *str_headers, *str_start, *empty_tuple;
static PyObject *str_global_rules, *str_safe_length, *str_request, *str_correlation;

/* ------------------------------------------------------------------------------------ */
/* Exchange: one request's send wrapper and state                                        */

GC_FUNCTIONS(Exchange, acc, ctx_token)

/* (name, value) of one of our id headers: a new tuple. */
static inline PyObject *
id_pair(PyObject *name, PyObject *value)
{
    PyObject *pair = PyTuple_New(2);
    if (pair != NULL) {
        Py_INCREF(name);
        PyTuple_SET_ITEM(pair, 0, name);
        Py_INCREF(value);
        PyTuple_SET_ITEM(pair, 1, value);
    }
    return pair;
}

/* items[:n] + [(rid name, value), (cid name, value)]: a new list. */
static PyObject *
id_headers(Exchange *self, PyObject **items, Py_ssize_t n)
{
    PyObject *out = PyList_New(n + 2);
    if (out == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_INCREF(items[i]);
        PyList_SET_ITEM(out, i, items[i]);
    }
    PyObject *rid_pair = id_pair(ACC(self)->rid, self->rid_value);
    PyObject *cid_pair = id_pair(ACC(self)->cid, self->cid_value);
    if (rid_pair == NULL || cid_pair == NULL) {
        Py_XDECREF(rid_pair);
        Py_XDECREF(cid_pair);
        Py_DECREF(out);
        return NULL;
    }
    PyList_SET_ITEM(out, n, rid_pair);
    PyList_SET_ITEM(out, n + 1, cid_pair);
    return out;
}

/* middleware._with_ids(headers, id_headers, names), for what the fast path leaves. */
static PyObject *
with_ids(Exchange *self, PyObject *headers)
{
    PyObject *ours = id_headers(self, NULL, 0);
    if (ours == NULL) {
        return NULL;
    }
    PyObject *out = PyObject_CallFunctionObjArgs(ACC(self)->with_ids, headers, ours,
                                                 ACC(self)->names, NULL);
    Py_DECREF(ours);
    return out;
}

/* The response start's headers with ours set: a new list. */
static PyObject *
headers_with_ids(Exchange *self, PyObject *headers)
{
    PyObject **items;
    Py_ssize_t n, i;
    if (!list_or_tuple_items(headers, &items, &n)) {
        return with_ids(self, headers);
    }
    for (i = 0; i < n; i++) {
        PyObject *name, *value;
        if (!unpack_pair(items[i], &name, &value)) {
            goto general;
        }
        /* One of ours set by the app, or a name that is not lowercase (which lower() could
           turn into one of ours): the general path drops them, as the Python path does. */
        if (same_bytes(name, ACC(self)->rid) || same_bytes(name, ACC(self)->cid)) {
            goto general;
        }
        const char *s = PyBytes_AS_STRING(name);
        Py_ssize_t len = PyBytes_GET_SIZE(name), j;
        for (j = 0; j < len; j++) {
            if (s[j] >= 'A' && s[j] <= 'Z') {
                goto general;
            }
        }
    }
    return id_headers(self, items, n);
general:
    return with_ids(self, headers);
}

static PyObject *
Exchange_vectorcall(PyObject *op, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Exchange *self = (Exchange *)op;
    if (PyVectorcall_NARGS(nargsf) != 1 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "send() takes exactly one message");
        return NULL;
    }
    PyObject *message = args[0];
    if (!self->started) {
        PyObject *kind;
        if (PyDict_CheckExact(message)) {
            kind = PyDict_GetItemWithError(message, str_type);
            if (kind == NULL) {
                if (!PyErr_Occurred()) {
                    PyErr_SetObject(PyExc_KeyError, str_type);
                }
                return NULL;
            }
            Py_INCREF(kind);
        }
        else if ((kind = PyObject_GetItem(message, str_type)) == NULL) {
            return NULL;
        }
        /* Frameworks send the literal, interned like ours: usually a pointer comparison. */
        int is_start = kind == str_start
                       || (PyUnicode_Check(kind) && PyUnicode_Compare(kind, str_start) == 0);
        Py_DECREF(kind);
        if (is_start) {
            self->started = 1;
            PyObject *headers, *out;
            if (PyDict_CheckExact(message)) {
                headers = PyDict_GetItemWithError(message, str_headers);
                if (headers == NULL && PyErr_Occurred()) {
                    return NULL;
                }
                Py_XINCREF(headers);
            }
            else {
                headers = PyObject_CallMethod(message, "get", "OO", str_headers, empty_tuple);
                if (headers == NULL) {
                    return NULL;
                }
            }
            if (headers == NULL) {
                out = id_headers(self, NULL, 0);
            }
            else {
                out = headers_with_ids(self, headers);
                Py_DECREF(headers);
            }
            if (out == NULL) {
                return NULL;
            }
            int failed = PyObject_SetItem(message, str_headers, out);
            Py_DECREF(out);
            if (failed) {
                return NULL;
            }
        }
    }
    return PyObject_Vectorcall(self->send, args, 1, NULL);
}

/* Enter the request: the frame [None, build, (identity, permissions, features, request_id,
   correlation_id, trace, thread_id, run_id, ws_id, created), cleanups, headers] (see
   current.py and middleware._request_context) made current. 0, or -1 with an error. */
static int
enter(Exchange *self, PyObject *identity, PyObject *permissions, PyObject *features)
{
    Accelerator *acc = ACC(self);
    if (self->ctx != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "this request was entered already");
        return -1;
    }
#ifdef CLOCK_REALTIME
    /* time.time(), without the call: the same clock_gettime(CLOCK_REALTIME). */
    struct timespec now;
    PyObject *created = clock_gettime(CLOCK_REALTIME, &now) == 0
                            ? PyFloat_FromDouble((double)now.tv_sec + now.tv_nsec * 1e-9)
                            : PyObject_CallNoArgs(acc->now);
#else
    PyObject *created = PyObject_CallNoArgs(acc->now);
#endif
    if (created == NULL) {
        return -1;
    }
    PyObject *build_args = PyTuple_New(10);
    PyObject *frame = PyList_New(5);
    PyObject *stack = PyList_New(0);
    if (build_args == NULL || frame == NULL || stack == NULL) {
        Py_DECREF(created);
        goto fail;
    }
    PyObject *fields[9] = {
        identity, permissions, features, self->request_id, self->correlation_id, self->trace,
        Py_None, Py_None, Py_None,
    };
    for (int i = 0; i < 9; i++) {
        Py_INCREF(fields[i]);
        PyTuple_SET_ITEM(build_args, i, fields[i]);
    }
    PyTuple_SET_ITEM(build_args, 9, created);
    Py_INCREF(Py_None);
    PyList_SET_ITEM(frame, 0, Py_None);
    Py_INCREF(acc->build);
    PyList_SET_ITEM(frame, 1, acc->build);
    PyList_SET_ITEM(frame, 2, build_args);
    build_args = NULL;
    Py_INCREF(stack);
    PyList_SET_ITEM(frame, 3, stack);
    Py_INCREF(self->headers);
    PyList_SET_ITEM(frame, 4, self->headers);
    PyObject *token = PyContextVar_Set(acc->current, frame);
    if (token == NULL) {
        goto fail;
    }
    self->ctx = frame;
    self->stack = stack;
    self->ctx_token = token;
    return 0;
fail:
    Py_XDECREF(build_args);
    Py_XDECREF(frame);
    Py_XDECREF(stack);
    return -1;
}

static PyObject *
Exchange_enter(Exchange *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "enter() takes identity, permissions and features");
        return NULL;
    }
    if (!PyFrozenSet_Check(args[1]) || !PyFrozenSet_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "permissions and features must be frozensets");
        return NULL;
    }
    if (enter(self, args[0], args[1], args[2]) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
Exchange_finish(Exchange *self, PyObject *Py_UNUSED(ignored))
{
    if (self->ctx == NULL || self->finished) {
        PyErr_SetString(PyExc_RuntimeError, "this request is not entered, or finished already");
        return NULL;
    }
    self->finished = 1;
    /* Both steps run, whatever fails; the first error is the one raised. */
    PyObject *type = NULL, *value = NULL, *tb = NULL;
    if (PyContextVar_Reset(ACC(self)->current, self->ctx_token) < 0) {
        PyErr_Fetch(&type, &value, &tb);
    }
    if (PyList_Append(self->stack, ACC(self)->closed) < 0) {
        if (type == NULL) {
            PyErr_Fetch(&type, &value, &tb);
        }
        PyErr_Clear();
    }
    if (type != NULL) {
        PyErr_Restore(type, value, tb);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
Exchange_get_started(Exchange *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->started);
}

static PyMethodDef Exchange_methods[] = {
    {"enter", (PyCFunction)(void (*)(void))Exchange_enter, METH_FASTCALL,
     "enter(identity, permissions, features): make the request's context current."},
    {"finish", (PyCFunction)Exchange_finish, METH_NOARGS,
     "Reset the context and close the cleanup list (once)."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Exchange_members[] = {
    {"authorization", T_OBJECT, offsetof(Exchange, authorization), READONLY,
     "the Authorization header values (None: the middleware has no authenticator)"},
    {"ctx", T_OBJECT, offsetof(Exchange, ctx), READONLY, "the request's frame, once entered"},
    {"stack", T_OBJECT, offsetof(Exchange, stack), READONLY, "the request's cleanups"},
    {NULL, 0, 0, 0, NULL},
};

static PyObject *
Exchange_get_id_headers(Exchange *self, void *Py_UNUSED(closure))
{
    return id_headers(self, NULL, 0);
}

static PyGetSetDef Exchange_getset[] = {
    {"id_headers", (getter)Exchange_get_id_headers, NULL, "the response's id headers (a new list)",
     NULL},
    {"started", (getter)Exchange_get_started, NULL, "whether the response has started", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject Exchange_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ctxvars_mw._speedups.Exchange",
    .tp_basicsize = sizeof(Exchange),
    .tp_dealloc = (destructor)Exchange_dealloc,
    .tp_vectorcall_offset = offsetof(Exchange, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "One request's send wrapper (sets the id headers) and state.",
    .tp_traverse = (traverseproc)Exchange_traverse,
    .tp_clear = (inquiry)Exchange_clear,
    .tp_methods = Exchange_methods,
    .tp_members = Exchange_members,
    .tp_getset = Exchange_getset,
};

/* ------------------------------------------------------------------------------------ */
/* Accelerator: one per ContextMiddleware                                                 */

GC_FUNCTIONS(Accelerator, rid_in, last_rules)

#define N_OPTIONS 19

static int
Accelerator_init(Accelerator *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {
        "rid_in", "cid_in", "rid", "cid", "names", "features", "no_names", "build",
        "accept_id", "with_ids", "generate_id", "now", "rules_var", "ids_module", "current",
        "closed", "authenticate", "id_chars", "id_max", NULL,
    };
    PyObject *o[N_OPTIONS] = {NULL};
    if (!PyArg_ParseTupleAndKeywords(
            args, kwds, "|$OOO!O!O!O!O!OOOOOO!OO!OO!O!O!", kwlist, &o[0], &o[1], &PyBytes_Type,
            &o[2], &PyBytes_Type, &o[3], &PyFrozenSet_Type, &o[4], &PyFrozenSet_Type, &o[5],
            &PyFrozenSet_Type, &o[6], &o[7], &o[8], &o[9], &o[10], &o[11],
            &PyContextVar_Type, &o[12], &o[13], &PyContextVar_Type, &o[14], &o[15],
            &PyBool_Type, &o[16], &PyBytes_Type, &o[17], &PyLong_Type, &o[18])) {
        return -1;
    }
    for (int i = 0; i < N_OPTIONS; i++) {
        if (o[i] == NULL) {
            PyErr_Format(PyExc_TypeError, "Accelerator() needs %s", kwlist[i]);
            return -1;
        }
    }
    for (int i = 0; i < 2; i++) {
        if (o[i] != Py_None && !(PyBytes_CheckExact(o[i]) && PyBytes_GET_SIZE(o[i]) > 0)) {
            PyErr_SetString(PyExc_TypeError, "rid_in and cid_in must be non-empty bytes or None");
            return -1;
        }
    }
    Py_ssize_t id_max = PyLong_AsSsize_t(o[18]);
    if (id_max == -1 && PyErr_Occurred()) {
        return -1;
    }
    PyObject **slots[N_OPTIONS - 3] = {
        &self->rid_in, &self->cid_in, &self->rid, &self->cid, &self->names, &self->features,
        &self->no_names, &self->build, &self->accept_id, &self->with_ids, &self->generate_id,
        &self->now, &self->rules_var, &self->ids_module, &self->current, &self->closed,
    };
    for (int i = 0; i < N_OPTIONS - 3; i++) {
        Py_INCREF(o[i]);
        Py_XSETREF(*slots[i], o[i]);
    }
    self->authenticate = o[16] == Py_True;
    self->id_max = id_max;
    memset(self->id_char, 0, sizeof(self->id_char));
    const unsigned char *chars = (const unsigned char *)PyBytes_AS_STRING(o[17]);
    for (Py_ssize_t i = 0; i < PyBytes_GET_SIZE(o[17]); i++) {
        self->id_char[chars[i]] = 1;
    }
    Py_CLEAR(self->last_rules);
    return 0;
}

/* The id rules in force (ids.get_id_rules()) and their _safe_length. */
static int
current_rules(Accelerator *self, PyObject **rules, Py_ssize_t *safe)
{
    PyObject *value;
    if (PyContextVar_Get(self->rules_var, Py_None, &value) < 0) {
        return -1;
    }
    if (value == Py_None) {
        Py_DECREF(value);
        value = PyObject_GetAttr(self->ids_module, str_global_rules);
        if (value == NULL) {
            return -1;
        }
    }
    if (value != self->last_rules) {
        PyObject *length = PyObject_GetAttr(value, str_safe_length);
        if (length == NULL) {
            Py_DECREF(value);
            return -1;
        }
        Py_ssize_t n = PyLong_AsSsize_t(length);
        Py_DECREF(length);
        if (n == -1 && PyErr_Occurred()) {
            Py_DECREF(value);
            return -1;
        }
        Py_INCREF(value);
        Py_XSETREF(self->last_rules, value);
        self->last_safe = n;
    }
    *rules = value;
    *safe = self->last_safe;
    return 0;
}

/* Accept one incoming id (raw bytes): *id is set to the raw bytes (a long id of header
   characters, also kept for the response header) or the str _accept_id returns, and left
   NULL when the id is replaced. 0, or -1 with an exception set. */
static int
accept(Accelerator *self, PyObject *raw, PyObject *kind, PyObject *rules, Py_ssize_t safe,
       PyObject **id, PyObject **header_value)
{
    Py_ssize_t len = PyBytes_GET_SIZE(raw);
    if (len >= safe && len <= self->id_max) {
        const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(raw);
        Py_ssize_t i;
        for (i = 0; i < len && self->id_char[s[i]]; i++) {
        }
        if (i == len) {
            Py_INCREF(raw);
            *id = raw; /* decoded by the context's builder, if anything reads it */
            *header_value = raw;
            return 0;
        }
    }
    PyObject *value = PyObject_CallFunctionObjArgs(self->accept_id, raw, kind, rules, NULL);
    if (value == NULL) {
        return -1;
    }
    if (value == Py_None) {
        Py_DECREF(value);
        return 0;
    }
    *id = value;
    return 0;
}

static PyObject *
Accelerator_start(Accelerator *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "start() takes scope and send");
        return NULL;
    }
    PyObject *scope = args[0], *send = args[1];
    if (!PyDict_CheckExact(scope)) {
        Py_RETURN_NONE;
    }
    PyObject *headers = PyDict_GetItemWithError(scope, str_headers);
    if (headers == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    PyObject **items;
    Py_ssize_t n;
    if (!list_or_tuple_items(headers, &items, &n)) {
        Py_RETURN_NONE;
    }
    /* Nested in another ContextMiddleware of this same request (its frame is current, with
       this very header list): the Python path, which keeps that request's ids. */
    PyObject *outer;
    if (PyContextVar_Get(self->current, Py_None, &outer) < 0) {
        return NULL;
    }
    int nested = PyList_CheckExact(outer) && PyList_GET_SIZE(outer) > 4
                 && PyList_GET_ITEM(outer, 4) == headers;
    Py_DECREF(outer);
    if (nested) {
        Py_RETURN_NONE;
    }

    /* The header scan, all checks first: nothing is allocated before the request is ours.
       A repeated id or traceparent is ambiguous: b"" (refused later). */
    PyObject *empty = PyBytes_FromStringAndSize(NULL, 0); /* the b"" singleton */
    if (empty == NULL) {
        return NULL;
    }
    PyObject *raw_rid = NULL, *raw_cid = NULL, *raw_trace = NULL;
    int any_auth = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *name, *value;
        if (!unpack_pair(items[i], &name, &value)) {
            Py_DECREF(empty);
            Py_RETURN_NONE;
        }
        Py_ssize_t len = PyBytes_GET_SIZE(name);
        PyObject **slot = NULL;
        if (self->rid_in != Py_None && same_bytes(name, self->rid_in)) {
            slot = &raw_rid;
        }
        else if (self->cid_in != Py_None && same_bytes(name, self->cid_in)) {
            slot = &raw_cid;
        }
        else if (len == 11 && bytes_equal(name, "traceparent", 11)) {
            slot = &raw_trace;
        }
        else if (len == 13 && self->authenticate && bytes_equal(name, "authorization", 13)) {
            any_auth = 1;
        }
        if (slot != NULL) {
            *slot = *slot == NULL ? value : empty;
        }
    }
    /* Strong references before anything is allocated: an allocation may run the garbage
       collector, and with it finalizers that could, in theory, change the header list. */
    Py_XINCREF(raw_rid);
    Py_XINCREF(raw_cid);
    Py_XINCREF(raw_trace);
    Py_INCREF(headers);

    Exchange *ex = PyObject_GC_New(Exchange, &Exchange_Type);
    if (ex == NULL) {
        goto fail_raw;
    }
    ex->vectorcall = Exchange_vectorcall;
    ex->started = ex->finished = 0;
    Py_INCREF(self);
    ex->acc = (PyObject *)self;
    Py_INCREF(send);
    ex->send = send;
    Py_INCREF(headers);
    ex->headers = headers;
    ex->rid_value = ex->cid_value = ex->request_id = ex->correlation_id = ex->trace = NULL;
    ex->authorization = ex->ctx = ex->stack = ex->ctx_token = NULL;
    PyObject_GC_Track(ex);

    /* From here on, ex owns what is made (dropping ex on error releases it all). */
    ex->trace = raw_trace != NULL ? raw_trace : Py_None;
    Py_INCREF(ex->trace);
    if (self->authenticate) {
        ex->authorization = PyList_New(0);
        if (ex->authorization == NULL) {
            goto fail_ex;
        }
        /* Read again, bounds checked on every step (see above); appending runs no code. */
        for (Py_ssize_t i = 0; any_auth && i < Py_SIZE(headers); i++) {
            PyObject *item = PyList_CheckExact(headers) ? PyList_GET_ITEM(headers, i)
                                                        : PyTuple_GET_ITEM(headers, i);
            PyObject *name, *value;
            if (unpack_pair(item, &name, &value) && PyBytes_GET_SIZE(name) == 13
                && bytes_equal(name, "authorization", 13)
                && PyList_Append(ex->authorization, value) < 0) {
                goto fail_ex;
            }
        }
    }

    PyObject *rid_value = NULL, *cid_value = NULL; /* borrowed: accepted raw bytes */
    if (raw_rid != NULL || raw_cid != NULL) {
        PyObject *rules;
        Py_ssize_t safe;
        if (current_rules(self, &rules, &safe) < 0) {
            goto fail_ex;
        }
        int failed = 0;
        if (raw_rid != NULL) {
            failed = accept(self, raw_rid, str_request, rules, safe, &ex->request_id,
                            &rid_value);
        }
        if (!failed && raw_cid != NULL) {
            failed = accept(self, raw_cid, str_correlation, rules, safe, &ex->correlation_id,
                            &cid_value);
        }
        Py_DECREF(rules);
        if (failed) {
            goto fail_ex;
        }
    }
    if (ex->request_id == NULL) {
        ex->request_id = PyObject_CallNoArgs(self->generate_id);
        if (ex->request_id == NULL) {
            goto fail_ex;
        }
        if (!PyUnicode_Check(ex->request_id)) {
            PyErr_SetString(PyExc_TypeError, "generate_id() must return a str");
            goto fail_ex;
        }
    }
    if (ex->correlation_id == NULL) {
        Py_INCREF(ex->request_id);
        ex->correlation_id = ex->request_id;
        cid_value = rid_value;
    }

    /* The response's id headers: the accepted raw bytes, or the ids encoded. */
    PyObject *rid_bytes, *cid_bytes;
    if (rid_value != NULL) {
        Py_INCREF(rid_value);
        rid_bytes = rid_value;
    }
    else if ((rid_bytes = PyUnicode_AsASCIIString(ex->request_id)) == NULL) {
        goto fail_ex;
    }
    if (cid_value != NULL) {
        Py_INCREF(cid_value);
        cid_bytes = cid_value;
    }
    else if (ex->correlation_id == ex->request_id) {
        Py_INCREF(rid_bytes);
        cid_bytes = rid_bytes;
    }
    else if ((cid_bytes = PyUnicode_AsASCIIString(ex->correlation_id)) == NULL) {
        Py_DECREF(rid_bytes);
        goto fail_ex;
    }
    ex->rid_value = rid_bytes;
    ex->cid_value = cid_bytes;

    /* Anonymous (no authenticator): FREE, no roles, the free tier's features. */
    if (!self->authenticate && enter(ex, Py_None, self->no_names, self->features) < 0) {
        goto fail_ex;
    }
    PyObject *result = (PyObject *)ex;
    goto done;
fail_ex:
    Py_DECREF(ex);
fail_raw:
    result = NULL;
done:
    Py_XDECREF(raw_rid);
    Py_XDECREF(raw_cid);
    Py_XDECREF(raw_trace);
    Py_DECREF(headers);
    Py_DECREF(empty);
    return result;
}

static PyMethodDef Accelerator_methods[] = {
    {"start", (PyCFunction)(void (*)(void))Accelerator_start, METH_FASTCALL,
     "start(scope, send) -> Exchange | None: begin an http request."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject Accelerator_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ctxvars_mw._speedups.Accelerator",
    .tp_basicsize = sizeof(Accelerator),
    .tp_dealloc = (destructor)Accelerator_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "ContextMiddleware's http path, configured once per middleware.",
    .tp_traverse = (traverseproc)Accelerator_traverse,
    .tp_clear = (inquiry)Accelerator_clear,
    .tp_methods = Accelerator_methods,
    .tp_init = (initproc)Accelerator_init,
    .tp_new = PyType_GenericNew,
};

/* ------------------------------------------------------------------------------------ */

static int
intern(PyObject **slot, const char *text)
{
    *slot = PyUnicode_InternFromString(text);
    return *slot == NULL ? -1 : 0;
}

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "ctxvars_mw._speedups",
    .m_doc = "ContextMiddleware's anonymous http path in C (optional; see middleware.py).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    if (intern(&str_type, "type") < 0 || intern(&str_headers, "headers") < 0
        || intern(&str_start, "http.response.start") < 0
        || intern(&str_global_rules, "_global_rules") < 0
        || intern(&str_safe_length, "_safe_length") < 0 || intern(&str_request, "request") < 0
        || intern(&str_correlation, "correlation") < 0) {
        return NULL;
    }
    empty_tuple = PyTuple_New(0);
    if (empty_tuple == NULL) {
        return NULL;
    }
    if (PyType_Ready(&Exchange_Type) < 0 || PyType_Ready(&Accelerator_Type) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&speedups_module);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(module, "Exchange", (PyObject *)&Exchange_Type) < 0
        || PyModule_AddObjectRef(module, "Accelerator", (PyObject *)&Accelerator_Type) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
