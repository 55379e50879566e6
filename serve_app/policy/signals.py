"""Cheap signals of a request's text: is it code (and in which language), is it reasoning. Pure.

The ingress runs this on every `"model": "auto"` request, so it is built for speed on a slow
CPU: the text is tokenised once (bytes.translate + split on ASCII), and features are set
lookups over its words and word pairs, substring tests and short loops over the few places a
character occurs. Regular expressions would be simpler to read, but Python's engine tries
every alternative at every position (~35 ns per character per pattern on the CI machine), and
a dozen of them over a 2,000-character prompt would cost a millisecond.
benchmarks/routing_speed.py measures the result.

Each feature adds a weight to a score once; a score of 3 is a signal. Weights are set so that
one weak cue never decides: a language name alone ("a python at the zoo", "the island of Java")
or numbers alone do not make code or maths.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

THRESHOLD = 3.0


@dataclass
class Score:
    score: float = 0.0
    evidence: list[str] = field(default_factory=list)
    # Code that is there (a fence, a trace, a diff, code lines), not just talked about.
    structural: bool = False

    def add(self, weight: float, name: str) -> None:
        self.score += weight
        self.evidence.append(name)

    def plus(self, other: Score, weight: float, cap: float, where: str) -> None:
        """Adds a share of the score of other text (earlier turns, the system prompt); code
        that is there counts in full, up to the cap."""
        extra = cap if other.structural else min(other.score * weight, cap)
        if extra > 0:
            self.score += extra
            self.evidence.append(f"{where} +{extra:g}")


# Words; runs of Chinese/Japanese/Korean characters are split from Latin ones ("用Python写").
_CJK = "\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af"
# Tokenising: on ASCII text, punctuation becomes spaces and str.split does the rest, which is
# ~6x faster here than a regular expression; other text takes the regular expression, which
# also splits Chinese/Japanese/Korean runs from Latin ones ("用Python写").
_CJK = "\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af"
_TOKEN = re.compile(rf"[{_CJK}]+|[^\W{_CJK}]+")
_PUNCTUATION = "".join(chr(c) for c in range(33, 127) if not chr(c).isalnum() and chr(c) != "_")
_TO_SPACES = bytes.maketrans(_PUNCTUATION.encode(), b" " * len(_PUNCTUATION))


_CJK_CHAR = re.compile(f"[{_CJK}]")
# Punctuation beyond ASCII that separates words.
_UNICODE_PUNCTUATION = "«»„“”‘’‚‹›¿¡—–…·•、。，！？：；（）【】「」『』《》〈〉"
_TO_SPACES_TEXT = str.maketrans({c: " " for c in _PUNCTUATION + _UNICODE_PUNCTUATION})


def tokenize(low: str) -> list[str]:
    if low.isascii():
        return low.encode().translate(_TO_SPACES).decode().split()
    if _CJK_CHAR.search(low):
        return _TOKEN.findall(low)
    # As low.translate(_TO_SPACES_TEXT).split(), ~4x faster: str.translate with a mapping
    # costs ~40 ns a character on non-ASCII text, a test for one character is C-fast.
    for mark in _UNICODE_PUNCTUATION:
        if mark in low:
            low = low.replace(mark, " ")
    return low.encode("utf-8", "surrogatepass").translate(_TO_SPACES).decode(
        "utf-8", "surrogatepass").split()


class Text:
    """One piece of request text, tokenised once (lowercase words, word pairs on demand)."""

    __slots__ = ("raw", "low", "tokens", "words", "ascii", "_norm", "_pairs", "_hits", "_lines")

    def __init__(self, raw: str) -> None:
        self.raw = raw
        low = raw.lower()
        if "c++" in low or "c#" in low:
            low = low.replace("c++", "cpp").replace("c#", "csharp")
        if "’" in low:
            low = low.replace("’", "'")
        self.low = low
        self.ascii = low.isascii()
        self.tokens = tokenize(low)
        self.words = frozenset(self.tokens)
        self._norm: str | None = None
        self._pairs: frozenset[tuple[str, str]] | None = None
        self._hits: dict[str, set[str]] | None = None
        self._lines: list[str] | None = None

    @property
    def norm(self) -> str:
        """The words joined by single spaces, padded: phrase tests are substring tests."""
        if self._norm is None:
            self._norm = f" {' '.join(self.tokens)} "
        return self._norm

    @property
    def lines(self) -> list[str]:
        if self._lines is None:
            self._lines = self.raw.splitlines()
        return self._lines

    def hits(self) -> dict[str, set[str]]:
        """This module's lexicon features found in the text -> the entries found."""
        if self._hits is None:
            self._hits = _LEXICON.scan(self)
        return self._hits

    @property
    def pairs(self) -> frozenset[tuple[str, str]]:
        if self._pairs is None:
            self._pairs = frozenset(zip(self.tokens, self.tokens[1:], strict=False))
        return self._pairs


def _occurrences(text: str, needle: str, limit: int = 16) -> list[int]:
    """Start indexes of `needle` in `text` (at most `limit`): str.find is C-fast."""
    found: list[int] = []
    i = text.find(needle)
    while i >= 0 and len(found) < limit:
        found.append(i)
        i = text.find(needle, i + 1)
    return found


class Lexicon:
    """Named features, each a set of words and phrases matched as whole words, looked up in one
    pass over a text's words and word pairs. Entries are written the way Text tokenises ("step
    by step" also matches "step-by-step"); entries in scripts without spaces between words
    (Chinese, Japanese) match as substrings."""

    def __init__(self, features: Mapping[str, Iterable[str]]) -> None:
        singles: dict[str, list[str]] = {}
        # Phrases by their first two words; most are two words long, so the pair decides.
        phrases: dict[tuple[str, str], list[tuple[str, str]]] = {}
        substrings: list[tuple[str, str]] = []
        for feature, entries in features.items():
            for entry in entries:
                entry = entry.strip().lower()
                if not entry:
                    continue
                tokens = tokenize(entry)
                if any("\u3040" <= ch <= "\ud7af" for ch in entry) or not tokens:
                    substrings.append((feature, entry))
                elif len(tokens) == 1:
                    singles.setdefault(tokens[0], []).append(feature)
                else:
                    phrases.setdefault((tokens[0], tokens[1]), []).append(
                        (feature, f" {' '.join(tokens)} "))
        self._singles = singles
        self._words = frozenset(singles)
        self._phrases = phrases
        self._pairs = frozenset(phrases)
        self._substrings = tuple(substrings)

    @classmethod
    def of(cls, entries: Iterable[str]) -> Lexicon:
        return cls({"": list(entries)})

    def scan(self, text: Text) -> dict[str, set[str]]:
        found: dict[str, set[str]] = {}
        for word in text.words & self._words:
            for feature in self._singles[word]:
                found.setdefault(feature, set()).add(word)
        pairs = text.pairs & self._pairs
        if pairs:
            norm = text.norm
            for pair in pairs:
                for feature, phrase in self._phrases[pair]:
                    if phrase.count(" ") == 3 or phrase in norm:
                        found.setdefault(feature, set()).add(phrase.strip())
        if self._substrings and not text.ascii:
            for feature, sub in self._substrings:
                if sub in text.low:
                    found.setdefault(feature, set()).add(sub)
        return found

    def any(self, text: Text) -> bool:
        return bool(self.scan(text))


_FEATURES: dict[str, list[str]] = {}


def _feature(name: str, block: str) -> str:
    """Registers a feature of the module's lexicon: entries separated by '|' or new lines."""
    _FEATURES[name] = [e for line in block.splitlines() for e in line.split("|")]
    return name


# --- code ------------------------------------------------------------------------------------

_TRACE_LITERALS = (
    "Traceback (most recent call last)", "Exception in thread", "panicked at", "goroutine ",
    "error[E", "egmentation fault", "core dumped", "undefined reference to", "npm ERR!",
    "Uncaught ", "SQLSTATE", "ORA-", "command not found", "No such file or directory",
    "CrashLoopBackOff", "ImagePullBackOff", "OOMKilled", "exit code ", "exit status ",
    "NullPointerException", "Permission denied (publickey)", "Errno ",
)
# Words that every trace above contains one of, so most texts skip the literal tests.
_TRACE_GATE = frozenset("""
traceback exception thread panicked goroutine segmentation dumped undefined err uncaught
sqlstate ora found such crashloopbackoff imagepullbackoff oomkilled exit nullpointerexception
denied errno
""".split())
_TRACE_LINE_STARTS = ("error:", "error[", "fatal:", "warning:", "ERROR:", "ERROR ", "FATAL:",
                      "FATAL ", "Caused by:", "at ")
_DIFF_LINE_STARTS = ("diff --git", "@@ -", "+++ b/", "--- a/")
# Line starts that prose does not have.
_CODE_STARTS = (
    "def ", "import ", "elif ", "async def ", "#include", "#!/", "#define", "@", "const ",
    "function ", "function(", "export ", "public ", "private ", "protected ", "static ",
    "func ", "fn ", "pub fn", "impl ", "package ", "namespace ", "struct ", "enum ",
    "interface ", "val ", "fun ", "print(", "println!", "console.", "printf(", "std::",
    "SELECT ", "INSERT INTO", "UPDATE ", "DELETE FROM", "CREATE TABLE", "CREATE INDEX",
    "ALTER TABLE", "WITH ", "RUN ", "COPY ", "CMD ", "ENTRYPOINT ", "WORKDIR ", "EXPOSE ", "ENV ",
    "apiVersion:", "kind: ", "metadata:", "spec:", "containers:", "image: ", "services:",
    "steps:", "runs-on:", "resource \"", "$ ", "sudo ", "apt ", "apt-get ", "pip install",
    "pip3 install", "npm ", "yarn ", "git ", "docker ", "kubectl ", "helm ", "chmod ",
    "echo $", "ls -", "grep ", "awk ", "sed ", "//", "/*", "\"\"\"", "'''", "<?php", "<div",
    "<template", "using System", "let mut ", "try {", "} ", "}", "{", "]", "];", ");", "end",
)
# Line starts that need code punctuation in the line to count ("for example, ..." is prose).
_WEAK_STARTS = ("for ", "if ", "while ", "return", "from ", "let ", "var ", "class ", "with ",
                "type ", "use ", "try:", "except", "else", "case ", "switch", "cd ", "curl ",
                "export ", "-- ", "FROM ", "#", "<")
_CODE_LINES_EXACT = frozenset({"return", "break", "continue", "pass", "else:", "try:", "end",
                               "fi", "done", "esac", "};", "})", "});", "*/", "else {"})
_CODE_ENDS = (":", ";", "{", "}", ")", "(", ",", "=>", "]", "[", "\\")
_OPERATORS = ("=>", "::", "!=", "==", "&&", "||", "+=", ":=", "){", ") {", "->", "<-", "===")


def _code_lines(t: Text, enough: int) -> int:
    """Lines that look like code in some language, counted up to `enough`."""
    count = 0
    for line in t.lines:
        if count >= enough:
            break
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith(_CODE_STARTS) or stripped in _CODE_LINES_EXACT:
            count += 1
        elif stripped.startswith(_WEAK_STARTS) and (
                stripped.endswith(_CODE_ENDS) or "(" in stripped or " = " in stripped):
            count += 1
        elif " = " in stripped and stripped.split(" = ", 1)[0].replace(".", "_").replace(
                "[", "_").replace("]", "").isidentifier():
            count += 1
        elif stripped.endswith((");", ")")) and "(" in stripped:
            head = stripped.split("(", 1)[0]
            if head and " " not in head and head.replace(".", "_").isidentifier():
                count += 1
    return count


def _has_trace(t: Text) -> bool:
    raw = t.raw
    if "rror" not in raw and "xception" not in raw and not t.words & _TRACE_GATE:
        return False
    if any(lit in raw for lit in _TRACE_LITERALS):
        return True
    for name in ("Error", "Exception"):
        for i in _occurrences(raw, name):
            after = raw[i + len(name):i + len(name) + 4]
            if i > 0 and raw[i - 1].isalpha() and (after[:1] == ":" or after.startswith(" at")):
                return True  # TypeError: ..., IOException at ...
    for line in t.lines[:400]:
        stripped = line.lstrip()
        if stripped.startswith(_TRACE_LINE_STARTS) and (
                not stripped.startswith("at ") or ("(" in stripped and line[:1].isspace())):
            return True
        if stripped.startswith('File "') and ", line " in stripped:
            return True
    return False


_CODE_SYMBOLS = frozenset("[]{}\\|$@;<>`#&_")


def _symbol_dense(raw: str) -> bool:
    """A word with four or more code symbols: a regex, a selector, a template, a glob."""
    if sum(raw.count(c) for c in "[]{}\\$") < 4:
        return False
    return any(len(word) >= 8 and sum(1 for c in word if c in _CODE_SYMBOLS) >= 4
               and not word.startswith(("http", "www"))
               for word in raw.split())


def _has_sql(raw: str) -> bool:
    if "SELECT " in raw:
        select = raw.find("SELECT ")
        if raw.find(" FROM ", select) > select or raw.find("\nFROM ", select) > select:
            return True
    return any(s in raw for s in ("INSERT INTO ", "DELETE FROM ", "CREATE TABLE ",
                                  "ALTER TABLE ", "CREATE INDEX ")) or (
        "UPDATE " in raw and " SET " in raw)


_EXTENSIONS = frozenset("""
py ipynb js mjs cjs jsx ts tsx go rs java kt kts c h cc cpp cxx hpp cs rb php swift scala lua
dart vue svelte sql sh bash zsh ps1 yaml yml toml json tf hcl gradle proto css scss html htm
xml csproj lock env ini cfg conf log
""".split())


def _extensions(t: Text) -> set[str]:
    """File extensions written as such ('main.py', '.env'), not the word ('py', 'go')."""
    found: set[str] = set()
    for ext in t.words & _EXTENSIONS:
        for i in _occurrences(t.low, "." + ext, 4):
            end = i + 1 + len(ext)
            if end == len(t.low) or not (t.low[end].isalnum() or t.low[end] == "_"):
                found.add(ext)
                break
    return found


def _token_at(raw: str, i: int) -> str:
    """The whitespace-delimited token around index i."""
    start = max(raw.rfind(" ", 0, i), raw.rfind("\n", 0, i)) + 1
    end = len(raw)
    for sep in (" ", "\n"):
        j = raw.find(sep, i)
        if 0 <= j < end:
            end = j
    return raw[start:end]


def _identifiers(t: Text, enough: int) -> int:
    """Identifiers and fragments prose does not contain, counted up to `enough`: shell
    commands, snake_case, calls, paths, flags, generics, scoped names, SQL in capitals."""
    raw = t.raw
    found = len(t.hits().get(_COMMANDS, _NONE))
    if "_" in raw and found < enough:
        found += sum(1 for i in _occurrences(raw, "_", 4)
                     if raw[i - 1:i].isalnum() and raw[i + 1:i + 2].isalnum())
    if "(" in raw and found < enough:
        for i in _occurrences(raw, "(", 8):
            if i == 0 or not (raw[i - 1].isalnum() or raw[i - 1] == "_"):
                continue
            head = _token_at(raw, i - 1).split("(", 1)[0]
            if raw[i + 1:i + 2] == ")" or "." in head.strip("."):
                found += 1  # f(), json.load(...)
    if "/" in raw and found < enough:
        paths = {_token_at(raw, i) for i in _occurrences(raw, "/", 6)}
        found += sum(1 for p in paths if p.count("/") >= 2 and "://" not in p
                     and any(c.isalpha() for c in p))
    if " -" in raw and found < enough:
        for i in _occurrences(raw, " -", 6):
            flag = _token_at(raw, i + 1)
            if (flag.startswith("--") and flag[2:3].isalpha()) or (
                    len(flag) == 2 and flag[1].isalpha()):
                found += 1
    if "<" in raw and found < enough:
        for i in _occurrences(raw, "<", 6):
            close = raw.find(">", i, i + 30)
            if i > 0 and raw[i - 1].isalnum() and close > 0 and " " not in raw[i:close]:
                found += 1  # List<String>
    if "::" in raw or "./" in raw:
        found += 1
    if found < enough and not raw.islower():
        found += sum(1 for kw in (" JOIN ", " WHERE ", "GROUP BY", "ORDER BY", "SELECT ")
                     if kw in raw)
    return min(found, enough)


_FILE_NAMES = _feature("file_names", """
dockerfile|makefile|cmakelists|jenkinsfile|gitignore|dockerignore
docker compose|package json|requirements txt|pyproject toml|cargo toml|go mod""")
_COMMANDS = _feature("commands", """
docker compose|docker run|docker build|docker exec|kubectl get|kubectl apply|kubectl logs
kubectl describe|git add|git clone|git commit|git push|git pull|git rebase|git merge
git checkout|git reset|git stash|git log|git diff|git branch|git revert|git cherry pick
npm install|npm run|npm i|npm ci|pip install|pip3 install|apt install|apt get install
brew install|sudo apt|sudo systemctl|chmod x""")
# Languages and tools; with a preposition before or a programming noun after, they are context.
_TECH = frozenset("""
python javascript js typescript ts java kotlin rust golang go c cpp csharp ruby php swift
scala sql tsql bash zsh powershell shell mysql postgres postgresql sqlite mongodb redis react
vue angular django flask fastapi node nodejs express spring rails laravel pandas numpy docker
kubernetes k8s terraform git curl nginx vba haskell boot linux unix pytest jest junit
mocha rspec cypress selenium jupyter elixir perl lua dart flutter net css html
tailwind sass ansible jenkins aws gcp azure jupyter tensorflow pytorch sklearn matlab r regex
""".split())
# Names that mean programming whatever the sentence (unlike python, java, go, rust, ruby).
_TECH_NAMES = frozenset("""
typescript javascript golang cpp csharp mysql postgres postgresql sqlite mongodb redis
django fastapi nodejs laravel numpy docker kubernetes k8s kubectl terraform nginx tailwind
ansible jenkins jupyter tensorflow pytorch sklearn regex pytest jest junit dockerfile graphql
webpack npm linux powershell github gitlab vscode html css json yaml
""".split())
_PREPOSITIONS = frozenset("in with using via en con mit avec em на в".split())
_TECH_NOUNS = frozenset("""
function functions script scripts code class classes program programs app apps project
projects package packages library libraries module modules framework frameworks loop loops for
list lists dict dicts dictionary dictionaries array arrays string strings variable variables
object objects method methods file files error errors exception exceptions syntax equivalent
developer engineer programmer version query queries table tables container containers image
images command commands repo repos branch branches component components hook hooks route
routes endpoint endpoints test tests type types generics interface interfaces struct structs
decorator decorators funktion fonction función notebook server api deployment deployments
cluster clusters pod pods service services namespace manifest config setup install
installation build builds job jobs pipeline workflow instance bucket database index schema
migration migrations model models query controller view views template templates
""".split())
_TOOL_PLACES = _feature("tool_places", """
in the terminal|using the terminal|from the terminal|in a terminal
on the command line|from the command line|in the shell|in the console|in the browser console""")
_ALGORITHMS = _feature("algorithms", """
linked list|binary search|binary tree|binary heap|hash map|hashmap|hash table|time complexity
space complexity|big o|sorting algorithm|quicksort|merge sort|mergesort|bubble sort
dynamic programming|depth first|breadth first|dijkstra|data structure|stack overflow
memoize|memoization|race condition|memory leak|off by one|null pointer|segfault|segfaults
stack trace|stacktrace|unit test|unit tests|compiler error|build fails|type hints|design pattern
dependency injection|for loop|while loop|infinite loop|list comprehension|regular expression""")
_ASK_VERBS = frozenset("""
write create implement generate build make code add give show schreibe schreib erstelle
implementiere écris écrivez crée créez implémente escribe escriba crea cree implementa scrivi
crea напиши реализуй
""".split())
_ASK_TARGETS = frozenset("""
function functions script program method query queries regex regexp code snippet test tests
endpoint api cli component module dockerfile makefile algorithm implementation migration
manifest workflow pipeline config configuration yaml schema playbook crontab webhook class
funktion fonction función funzione функцию функция skript requête consulta klasse
""".split())
_FIX_VERBS = frozenset("""
fix debug refactor optimize optimise review port rewrite convert translate vectorize lint
""".split())
_FIX_TARGETS = frozenset("""
code function script bug query class method program loop snippet test tests regex error
exception crash endpoint component module dockerfile config sql python javascript typescript
java go rust cpp csharp
""".split())
_CJK_CODE = ("函数", "代码", "编程", "脚本", "报错", "调试", "数据库", "正则", "コード", "関数",
             "プログラム", "スクリプト")
_CODE_WORDS = frozenset("""
function functions method methods variable variables compile compiler compiled debug debugger
debugging refactor refactoring regex regexp api apis endpoint endpoints json sql query queries
script scripts bash shell dockerfile kubernetes k8s docker helm terraform nginx repo repository
git github gitlab commit commits npm pip pypi dependency dependencies import imports struct
structs enum interface interfaces array arrays hashmap dict tuple tuples pointer pointers null
nullptr undefined exception exceptions stacktrace segfault runtime async await thread threads
threading mutex recursion recursive iterator callback callbacks lambda integer boolean parse
parser parsing syntax pytest jest junit unittest lint linter eslint frontend backend database
databases schema migration migrations orm django flask fastapi nodejs laravel pandas numpy
dataframe cli config yaml cron crontab systemd ci cd bug bugs code coding codebase programming
programmer snippet implement implementation typescript javascript golang kotlin postgres
postgresql mysql sqlite mongodb redis kafka linux unix powershell vim ide vscode http https
html css dom webpack vite cargo rustc gcc clang cmake jvm gradle maven dotnet linq csharp cpp
stdout stderr stdin argv localhost socket sockets tcp curl ssh sudo apt kubectl microservice
microservices oauth jwt cors graphql webhook webhooks sdk typeerror valueerror keyerror
nullpointerexception indexerror utf serialize deserialize serialization bitwise malloc
goroutine goroutines polymorphism iterable decorator decorators coroutine coroutines
boilerplate refactored deprecated middleware namespace namespaces react closure closures
terminal iterate iterating div flexbox tailwind bootstrap jquery ansible playbook jenkins
circleci aws s3 ec2 gcp azure heroku vercel netlify firebase supabase prisma sequelize
hibernate jpa mockito selenium cypress playwright babel prettier deno yarn pnpm conda venv
virtualenv poetry jupyter matplotlib seaborn sklearn tensorflow pytorch keras celery rabbitmq
grpc protobuf websocket websockets openapi swagger postman base64 typedef ndarray cuda podman
vagrant daemon useeffect usestate props jsx tsx svelte nextjs nuxt redux apollo hadoop airflow
dbt bigquery redshift elasticsearch kibana grafana prometheus datadog sentry istio envoy pulumi
cloudformation tmux neovim emacs intellij xcode sbt crate crates nuget homebrew yum chown scp
rsync wget xargs crud csrf xss devops fullstack restful enumerate interpreter bytecode uvicorn
gunicorn vuejs angularjs
""".split())
# Language names count only beside other evidence.
_LANGUAGE_WORDS = frozenset("""
python javascript typescript java kotlin rust golang ruby php swift scala perl haskell cpp
csharp sql bash powershell
""".split())
_HOWTO = _feature("howto", """
how do i|how can i|how should i|how would i|how do we|how can we|how do you|how to
what's the best way to|what is the best way to|is there a way to|what does|what is the difference
what's the difference|when should i use|why does|why do|why is|why am i|equivalent of
equivalent in|equivalent to|explain what|explain how|explain the difference|what is a|what is an
what are|fix it|fix this""")


# Code has at least one of these; structure checks are skipped for text without any.
_CODE_CHARS = frozenset("`(){}[];=<>_/\\#$@|:\n")


def _structure(t: Text) -> str | None:
    """The first piece of code found in the text (not just talked about), if any."""
    raw = t.raw
    if "```" in raw or "~~~" in raw:
        return "fenced block"
    if _has_trace(t):
        return "error trace"
    if _has_sql(raw):
        return "SQL statement"
    if _CODE_CHARS.isdisjoint(raw):
        return None  # prose without any of these characters has none of what follows
    if "\n" in raw and any(start in raw for start in _DIFF_LINE_STARTS):
        return "diff"
    if _symbol_dense(raw):
        return "code fragment"
    if _code_lines(t, 2) + min(sum(1 for op in _OPERATORS if op in raw), 2) >= 2:
        return "code lines"
    return None


_CONTEXT_PAIRS = frozenset(
    {(p, name) for p in _PREPOSITIONS for name in _TECH}
    | {(name, noun) for name in _TECH for noun in _TECH_NOUNS})


def structure(t: Text) -> str | None:
    """The kind of code that is in the text (a fence, a trace, a diff, SQL, code lines), if
    any: the high-precision part of the code signal."""
    return _structure(t)


def rule_scores(t: Text) -> tuple[Score, Score | None]:
    """The hand-written code score and, unless code is there (structural), the reasoning
    score."""
    code = score_code(t)
    return code, (None if code.structural else score_reasoning(t))


def _bucket(score: float) -> int:
    return 0 if score < 1.5 else 1 if score < THRESHOLD else 2 if score < 5 else 3


def rule_features(code: Score, reasoning: Score | None) -> tuple[str, ...]:
    """The hand-written scores as features of the learned classifier: each score's bucket and
    each piece of evidence ("~ev:reasoning:puzzle"), so it learns how far to trust them."""
    if code.structural or reasoning is None:
        return ("~rule:structural",)
    out = [f"~rule:code{_bucket(code.score)}", f"~rule:reasoning{_bucket(reasoning.score)}"]
    out += [f"~ev:code:{e.split(' (')[0]}" for e in code.evidence]
    out += [f"~ev:reasoning:{e.split(' (')[0]}" for e in reasoning.evidence]
    return tuple(out)


def score_code(t: Text) -> Score:
    s = Score()
    raw, words = t.raw, t.words
    if not raw:
        return s
    structure = _structure(t)
    if structure:
        # Code is there: nothing else can change the outcome, so stop here.
        s.add(3.0, structure)
        s.structural = True
        return s
    hits = t.hits()
    if _CODE_CHARS.isdisjoint(raw) and words.isdisjoint(_CODE_GATE) and t.ascii \
            and _COMMANDS not in hits and _TOOL_PLACES not in hits and _ALGORITHMS not in hits \
            and _FILE_NAMES not in hits:
        return s  # nothing below can fire
    if not _CODE_CHARS.isdisjoint(raw):
        if _code_lines(t, 1):
            s.add(1.5, "a code-like line")
        if "`" in raw and any(0 < len(part) <= 80 and "\n" not in part
                              for part in raw.split("`")[1:-1:2]):
            s.add(1.5, "inline code")
    identifiers = _identifiers(t, 3)
    if identifiers:
        s.add(identifiers * 0.75, "code identifiers or commands")
    if _extensions(t) or _FILE_NAMES in hits:
        s.add(1.5, "file name")
    context = _language_context(t)
    if context:
        s.add(2.5, "programming language or tool named in context")
    if _ALGORITHMS in hits:
        s.add(2.0, "programming concept")
    tools = words & _TECH_NAMES
    if tools:
        s.add(1.5, "names a programming tool")
    if _asks_for_code(t):
        s.add(2.5, "programming ask")
    vocab = len(words & _CODE_WORDS)
    if vocab:
        s.add(min(vocab * 1.0, 3.0), f"{vocab} programming term{'s' if vocab > 1 else ''}")
    languages = words & _LANGUAGE_WORDS
    if not context and s.score > 0 and languages:
        other_terms = vocab > len(languages & _CODE_WORDS)
        s.add(2.0 if other_terms else 1.0, "language name")
    if (vocab or s.score >= 1.5) and _HOWTO in hits:
        s.add(1.0, "technical how-to")
    return s


def _language_context(t: Text) -> bool:
    """'in Python', 'Python function', 'Kotlin: ...'."""
    if _TOOL_PLACES in t.hits():
        return True
    tech = t.words & _TECH
    if not tech:
        return False
    if t.tokens[0] in tech and t.low.lstrip()[len(t.tokens[0]):].lstrip()[:1] == ":":
        return True
    if t.pairs & _CONTEXT_PAIRS:
        return True
    if not t.ascii and "用" in t.raw:
        return any(f"用{name}" in t.low for name in tech)
    return any(f"{name}'s " in t.low for name in tech & _LANGUAGE_WORDS)


def _asks_for_code(t: Text) -> bool:
    """'write a function ...', 'fix this bug', 'refactor ... code' (a target word within ten
    words after the verb), or a programming term in Chinese/Japanese."""
    if not t.ascii and any(term in t.raw for term in _CJK_CODE):
        return True
    words = t.words
    for verbs, targets in ((_ASK_VERBS, _ASK_TARGETS), (_FIX_VERBS, _FIX_TARGETS)):
        if not words & targets:
            continue
        for verb in words & verbs:
            for i in _occurrences(t.norm, f" {verb} ", 8):
                if targets.intersection(t.norm[i:i + 160].split()[1:11]):
                    return True
    return False


# Language: a fence tag names it; otherwise names, file extensions and keywords vote.
_FENCE_TAG = re.compile(r"```[ \t]*([\w#+.-]+)")
_TAG_ALIASES = {
    "py": "python", "python3": "python", "ipython": "python", "python": "python",
    "js": "javascript", "javascript": "javascript", "jsx": "javascript", "node": "javascript",
    "mjs": "javascript", "ts": "typescript", "typescript": "typescript", "tsx": "typescript",
    "go": "go", "golang": "go", "rs": "rust", "rust": "rust", "java": "java",
    "kt": "kotlin", "kotlin": "kotlin", "c": "c", "h": "c", "cpp": "cpp", "c++": "cpp",
    "cc": "cpp", "cxx": "cpp", "hpp": "cpp", "cs": "csharp", "csharp": "csharp", "c#": "csharp",
    "sql": "sql", "postgresql": "sql", "postgres": "sql", "mysql": "sql", "sqlite": "sql",
    "plsql": "sql", "tsql": "sql", "sh": "shell", "bash": "shell", "shell": "shell",
    "zsh": "shell", "console": "shell", "shell-session": "shell", "powershell": "powershell",
    "ps1": "powershell", "yaml": "yaml", "yml": "yaml", "dockerfile": "dockerfile",
    "docker": "dockerfile", "hcl": "terraform", "terraform": "terraform", "tf": "terraform",
    "rb": "ruby", "ruby": "ruby", "php": "php", "swift": "swift", "scala": "scala",
    "html": "html", "css": "css", "scss": "css", "json": "json", "toml": "toml",
    "lua": "lua", "r": "r", "dart": "dart", "haskell": "haskell", "hs": "haskell",
    "perl": "perl", "elixir": "elixir", "ex": "elixir",
}
_LANGUAGE_KEYWORDS: dict[str, frozenset[str]] = {
    name: frozenset(words.split()) for name, words in {
        "python": "python def elif self none pip pandas numpy django flask pytest fastapi py "
                  "ipynb jupyter dataframe venv conda __init__ traceback indentationerror "
                  "keyerror valueerror typeerror importerror modulenotfounderror lambda",
        "javascript": "javascript js const let console require npm node nodejs react jsx "
                      "express vue angular document window promise fetch async useeffect "
                      "usestate yarn webpack",
        "typescript": "typescript ts tsx interface tsc generics",
        "go": "go golang func fmt goroutine goroutines chan gomod defer",
        "rust": "rust fn mut impl cargo rs rustc vec unwrap borrow println crate crates",
        "java": "java public static void jvm spring maven junit arraylist hibernate "
                "nullpointerexception override",
        "kotlin": "kotlin fun val kt kts coroutine suspend",
        "c": "c printf malloc free stdio stdlib gcc segmentation struct pointer char strcpy "
             "strlen sizeof unsigned int main",
        "cpp": "cpp std cout vector nullptr template unique_ptr shared_ptr clang",
        "csharp": "csharp dotnet net linq unity task console asp",
        "sql": "sql select join where postgres postgresql mysql sqlite query index table "
               "tables database",
        "shell": "bash shell sh zsh sudo apt chmod grep awk sed cron crontab xargs terminal",
        "powershell": "powershell ps1 cmdlet",
        "dockerfile": "docker dockerfile image container compose",
        "kubernetes": "kubernetes k8s kubectl helm pod pods deployment crashloopbackoff ingress",
        "yaml": "yaml yml workflow actions",
        "terraform": "terraform tf hcl resource provider",
        "ruby": "ruby rails gem puts rb",
        "php": "php laravel composer",
        "swift": "swift swiftui xcode ios",
        "html": "html div span dom",
        "css": "css flexbox grid tailwind scss margin padding",
    }.items()
}
_EXT_LANGUAGE = {
    "py": "python", "ipynb": "python", "js": "javascript", "mjs": "javascript",
    "cjs": "javascript", "jsx": "javascript", "ts": "typescript", "tsx": "typescript",
    "go": "go", "rs": "rust", "java": "java", "kt": "kotlin", "kts": "kotlin", "c": "c",
    "h": "c", "cc": "cpp", "cpp": "cpp", "cxx": "cpp", "hpp": "cpp", "cs": "csharp",
    "rb": "ruby", "php": "php", "swift": "swift", "sql": "sql", "sh": "shell",
    "bash": "shell", "zsh": "shell", "ps1": "powershell", "yaml": "yaml", "yml": "yaml",
    "tf": "terraform", "html": "html", "css": "css", "scss": "css",
}
_NAME_LANGUAGE = {
    "python": "python", "javascript": "javascript", "js": "javascript", "node": "javascript",
    "nodejs": "javascript", "react": "javascript", "typescript": "typescript", "go": "go",
    "golang": "go", "rust": "rust", "java": "java", "kotlin": "kotlin", "cpp": "cpp",
    "csharp": "csharp", "sql": "sql", "mysql": "sql", "postgres": "sql",
    "postgresql": "sql", "sqlite": "sql", "bash": "shell", "shell": "shell",
    "powershell": "powershell", "dockerfile": "dockerfile", "docker": "dockerfile",
    "kubernetes": "kubernetes", "k8s": "kubernetes", "kubectl": "kubernetes",
    "terraform": "terraform", "ruby": "ruby", "rails": "ruby", "php": "php",
    "swift": "swift", "css": "css", "html": "html", "yaml": "yaml",
}
KNOWN_LANGUAGES = frozenset(_TAG_ALIASES.values()) | frozenset(_LANGUAGE_KEYWORDS)
# keyword -> the languages it suggests
_KEYWORD_LANGUAGES: dict[str, tuple[str, ...]] = {}
for _lang, _keywords in _LANGUAGE_KEYWORDS.items():
    for _word in _keywords:
        _KEYWORD_LANGUAGES[_word] = (*_KEYWORD_LANGUAGES.get(_word, ()), _lang)


def language(t: Text) -> str | None:
    """The programming language of code-bearing text, or None when it cannot be told."""
    if "```" in t.raw:
        tag = _FENCE_TAG.search(t.raw)
        if tag:
            named = _TAG_ALIASES.get(tag.group(1).lower())
            if named:
                return named
    votes: dict[str, float] = {}
    for name in t.words & _NAME_LANGUAGE.keys():
        if name in ("go", "c") and not _language_context(t):
            continue  # too common as English words to count alone
        lang = _NAME_LANGUAGE[name]
        votes[lang] = votes.get(lang, 0.0) + 3.0
    for ext in _extensions(t) & _EXT_LANGUAGE.keys():
        lang = _EXT_LANGUAGE[ext]
        votes[lang] = votes.get(lang, 0.0) + 2.0
    for word in t.words & _KEYWORD_LANGUAGES.keys():
        for lang in _KEYWORD_LANGUAGES[word]:
            votes[lang] = votes.get(lang, 0.0) + 1.0
    if not votes:
        return None
    return max(votes.items(), key=lambda item: item[1])[0]


# --- reasoning -------------------------------------------------------------------------------

_PROVE_VERBS = frozenset("""
prove derive beweise beweisen zeige zeigen démontrez démontre démontrer prouvez prouve
prouver montrez demuestra demuestre demostrar dimostra dimostrare докажите докажи
""".split())
_PROVE = _feature("prove", """
prove|proving|proof that|proof of the|derive|derivation of|demonstrate that
show that|prove your answer|beweis|beweise|beweisen|démontrer|démontrez|demuestra|demuestre
demostrar|dimostra|dimostrare|докажите|докажи|доказательство|证明|証明""")
_PROOF_TERMS = _feature("proof_terms", """
theorem|lemma|corollary|induction|contradiction|qed|q e d|if and only if
irrational|infinitely many|for all|for every|there exists|there exist|integer|integers
natural number|natural numbers|real number|real numbers|axiom|axioms|rigorous|rigorously
divisible|∀|∃""")
_STEPS = _feature("steps", """
step by step|think carefully|think it through|think through|think hard
think step|think about it carefully|think about this carefully|let's think|lets think
reason through|reason it through|reason step|show your work|show all work|show the work
show your steps|show all steps|show the steps|show your reasoning|show the reasoning
show your calculations|show the calculation|show the calculations|show the math|show me the math
show the maths|walk me through the math|walk me through the calculation
walk me through the logic|walk me through the reasoning|walk me through the counting
walk me through your reasoning|schritt für schritt|étape par étape|paso a paso|passo dopo passo
passo per passo|шаг за шагом|一步一步|逐步|ステップバイステップ""")
_PROCEDURE = frozenset("instructions guide tutorial directions recipe process setup installation"
                       .split())
_JUSTIFY = _feature("justify", """
justify|explain your reasoning|explain each step|check your answer
is the following argument valid|is this argument valid|is this reasoning valid|reason carefully
can we conclude|can you conclude|does it follow|is the conclusion valid|necessarily true
logically follow|logically follows""")
_PUZZLE = _feature("puzzle", """
puzzle|riddle|brain teaser|brainteaser|knights and knaves|knight and knave
knaves|always lies|always lie|always tells the truth|always tell the truth|truth teller
truth tellers|river crossing|cross a river|cross the river|zebra puzzle|sudoku|syllogism
paradox|weighing|weighings|rätsel|énigme|acertijo|indovinello|головоломка|谜题|谜语""")
_PUZZLE_CUES = _feature("puzzle_cues", """
how do you figure out|how can you figure out|how would you figure out
how do you determine|how can you determine|how can you identify|how do you identify
how can you tell|how do you find|how can you find|how can you guarantee|how do you relabel
how does he do it|how does she do it|how do they do it|only once|only one trip|at most
you may only|you can only|you may pick|you can pick|you may ask|you can ask|labels are wrong
labels are all wrong|mislabeled|mislabelled|yes no questions|the boat holds|the boat carries
heavier or lighter|is it possible to|is it possible for|is it possible that|exactly once
father's son|father's father|mother's son|mother's daughter|brother's son|sister's son
who came last|who came first|who finished last|who finished first|who is in the middle
who sits in the middle""")
_LOGIC = _feature("logic", """
each of them|exactly one|exactly two|only one of|one of them|who owns|who is
who has|who lives|who drinks|who sits|who stole|who took|which one|which person|which box
which door|which house|which switch|lying|lies|tells the truth|neither|not next to
not adjacent|sits next to|to the left of|to the right of|different color|different colour
different pet|different drink|different nationality|follows logically|must be true|conclude
therefore|definitely|all of them|none of them""")
_MATH = _feature("math", """
integral|integrate|derivative|differentiate|limit of|probability|probabilities
expected value|variance|standard deviation|equation|equations|solve for|solve|factorial|prime
primes|divisible|divided by|modulo|remainder|gcd|lcm|permutation|permutations|combinations
combinatorics|matrix|matrices|eigenvalue|eigenvalues|eigenvector|polynomial|quadratic
logarithm|sqrt|arithmetic|geometric|series|converge|converges|convergence|inequality
triangle|rectangle|circle|perimeter|radius|area|volume|percent|percentage|interest rate
compound interest|compounded|ratio|average speed|calculate|compute|evaluate|simplify
estimate|minimum number|maximum number|worst case|expected number|odd|even|sum|product|digit
digits|coin flips|coin flip|coin tosses|dice|die rolls|heads|tails|in a row|odds|at random
without replacement|angle|degrees|fills|drains|pipe|pipes|nth|every other|fraction|fractions|at the same rate|working together
rate of|per hour|speed|distance|depreciates|depreciation|apr|interest|wahrscheinlichkeit
probabilité|probabilidad|gleichung|équation|ecuación|berechne|berechnen|calcule|calculer
calcula|calcular|winkel|dreieck|somme|suma|summe""")
_MATH_OPERATORS = "+-*/^×÷%=<>≤≥√∑∫π∞²³"
_ALWAYS_MATH = frozenset("^×÷≤≥√∑∫π∞²³")

_COUNTING = _feature("counting", """
how many ways|how many different ways|how many distinct ways
in how many ways|number of ways|how many arrangements|how many combinations
how many permutations|how many handshakes|how many paths|how many possible|how many different
how many distinct|how many unique""")
_QUESTION_CUES = _feature("question_cues", """
how many|how much|how long|how far|how fast|how old|how often|what fraction|what percentage
what percent|is left|are left|remain|remains|remaining|left over|in total|altogether
what is the total|what's the total|what is the probability|what's the probability
what is the chance|what's the chance|what are the odds|what is the minimum|what is the maximum
what is the smallest|what is the largest|what is the average|what is the expected
what is the speed|what is the distance|what is the cost|what is the value|what is the area
what is the volume|what was the original|what is the original|what is the final
what is the angle|what is the fastest|what is the quickest|what is the shortest
what is the longest|what is the fewest|what is the least|what is the most|when will|when does
when do|when would|at what time|at what point|at what speed|at what rate|which day|which hour
which month|which year|which week|in what order|what order|find|calculate|compute|determine
work out|figure out|solve|estimate|how should we set up|how should we split
how should we allocate|how should i split|how should i allocate|wie viele|wie lange|combien
cuántos|cuánto|quanti|quanto|сколько""")
# Every byte but the digits becomes a space: splitting then counts the runs of digits.
_DIGIT_RUNS = bytes.maketrans(
    bytes(c for c in range(256) if not 48 <= c <= 57),
    b" " * (256 - 10))


def _numbers(raw: str) -> int:
    return len(raw.encode("utf-8", "surrogatepass").translate(_DIGIT_RUNS).split())
_NUMBER_WORDS = frozenset("""
two three four five six seven eight nine ten eleven twelve twenty hundred thousand twice half
double triple thrice zwei drei vier deux trois quatre dos tres cuatro
""".split())
_PROBABILITY = _feature("probability", """
what is the probability|what's the probability|probability of|probability that
expected value|expected number|odds of getting|chance of getting|chances of getting
at least one|at most one|exactly one of""")
_PLANNING = _feature("planning", """
plan|schedule|scheduling|itinerary|allocate|allocation|assign|timetable
seating|roster|shifts|rota|sequence the|order the tasks|critical path|day by day""")
_CONSTRAINTS = _feature("constraints", """
constraint|constraints|subject to|no more than|never more than|must not
cannot|can't|can only|at most|at least|deadline|deadlines|budget of|budget|exactly|only if
unless|must be|must come|must have|must sit|must include|must visit|must finish|must rest
must start|refuse to|refuses to|has to|have to|need to|needs to|valid|limited|capacity
must follow|must precede|must happen|must go|not both|not on the same|same day|in a row|at a time
per day|each day|depends on|prerequisite|only one|can't be|cannot be|has to be|no two""")
_OPTIMIZE = _feature("optimize", """
maximize|maximise|minimize|minimise|optimize|optimise|optimal
best possible|fewest|shortest|cheapest|most efficient|per dollar""")
_TRADEOFF = _feature("tradeoff", """
trade off|trade offs|tradeoff|tradeoffs|pros and cons|weigh it|weigh the
weigh up|weigh my|weigh our|weigh them|weighing the|cost benefit|break even|breakeven
which option|which approach|which plan|which strategy|which offer|which choice|which one has
which has a higher|which has higher|which has a lower|which gives|which yields|better deal
better option|better investment|opportunity cost|expected return|decision matrix|rent or buy
lease or buy""")

_OPTIMIZE_VERBS = ("maximize", "maximise", "minimize", "minimise", "optimize", "optimise")
_OBJECTIVES = frozenset("""
cost costs profit revenue time distance number risk waste lateness delay throughput utility
return value
""".split())


def _has_objective(t: Text) -> bool:
    """'minimize the total cost', 'maximise profit': an optimisation with its objective."""
    for verb in _OPTIMIZE_VERBS:
        for i in _occurrences(t.norm, f" {verb} ", 4):
            if _OBJECTIVES.intersection(t.norm[i:i + 80].split()[1:5]):
                return True
    return False


def _should_or(low: str) -> bool:
    """'should we rent or buy', 'should I take the offer or stay'."""
    return any(" or " in low[i:i + 100] for start in ("should i ", "should we ")
               for i in _occurrences(low, start, 4))


_SENTENCE_ENDS = tuple(".!?:;。！？\n")
_RELATION_WORDS = ("than", "before", "after", "behind", "ahead of", "left of", "right of",
                   "next to", "above", "below")
_RELATION_GATE = frozenset({"than", "before", "after", "behind", "ahead", "left", "right", "next",
                            "above", "below"})


def _asks_to_prove(t: Text) -> bool:
    """An imperative 'Prove ...' / 'Show that ...' opening a sentence."""
    verbs = t.words & _PROVE_VERBS
    if "show that" in t.norm:
        verbs = verbs | {"show that"}
    if not t.ascii:
        verbs = verbs | {v for v in ("证明", "証明") if v in t.low}
    low = t.low
    for verb in verbs:
        for i in _occurrences(low, verb, 8):
            before = low[:i].rstrip()
            if before.endswith("please"):
                before = before[:-6].rstrip()
            if not before or before.endswith(_SENTENCE_ENDS):
                return True
    return False


def _ordering_relations(raw: str) -> int:
    """'older than Bob', 'after Spike': relations between named people."""
    count = 0
    for word in _RELATION_WORDS:
        for i in _occurrences(raw, f" {word} ", 8):
            name = raw[i + len(word) + 2:i + len(word) + 4]
            if name[:1].isupper() and name[1:2].islower():
                count += 1
    return count


def _syllogisms(norm: str) -> int:
    """'all cats are', 'some mammals are', 'no fish are'."""
    found = 0
    for i in _occurrences(norm, " are ", 16):
        before = norm[max(0, i - 40):i].split()[-2:]
        if len(before) == 2 and before[0] in ("all", "some", "no") and before[1].endswith("s"):
            found += 1
    return found


def _math_symbols(raw: str) -> int:
    """Distinct operators used as maths: '3 + 4', '2x = 10', '15%', 'x^2', '√2'."""
    found = 0
    for op in _MATH_OPERATORS:
        if op not in raw:
            continue
        if op in _ALWAYS_MATH:
            found += 1
            continue
        for i in _occurrences(raw, op, 4):
            before = raw[max(0, i - 3):i].rstrip()
            after = raw[i + 1:i + 3].lstrip()[:1]
            if op == "%":
                ok = before[-1:].isdigit()
            else:
                # a digit, or a lone lowercase variable ('2x', ' x'), on the left
                left = before[-1:]
                ok = (left.isdigit() or (left.isalpha() and left.islower()
                                         and not before[-2:-1].isalpha())) \
                    and (after.isdigit() or after == "(" or (after.islower() and op != "-"))
            if ok:
                found += 1
                break
        if found >= 3:
            break
    return found


def score_reasoning(t: Text) -> Score:
    s = Score()
    raw, low, words = t.raw, t.low, t.words
    if not raw:
        return s
    hits = t.hits()
    if t.ascii and hits.keys().isdisjoint(_REASONING_FEATURES) and words.isdisjoint(
            _REASONING_GATE) and _MATH_OPERATOR_SET.isdisjoint(raw) and " are " not in t.norm:
        return s  # nothing below can fire
    if _asks_to_prove(t):
        s.add(3.0, "asks for a proof or derivation")
    elif _PROVE in hits:
        s.add(2.0, "mentions a proof or derivation")
    terms = len(hits.get(_PROOF_TERMS, _NONE))
    if terms:
        s.add(min(terms, 2) * 1.0, "proof terms")
    steps = hits.get(_STEPS, _NONE)
    if steps and not (words & _PROCEDURE and steps == {"step by step"}):
        s.add(3.0, "asks for step-by-step reasoning")
    if _JUSTIFY in hits:
        s.add(2.0, "asks to justify the answer")
    if _PUZZLE in hits:
        s.add(3.0, "puzzle")
    cues = len(hits.get(_PUZZLE_CUES, _NONE))
    if cues:
        s.add(min(cues, 2) * 1.5, "puzzle-shaped question")
    relations = _ordering_relations(raw) if words & _RELATION_GATE else 0
    if relations >= 2:
        s.add(3.0 if relations >= 3 else 1.5, "ordering relations")
    logic = len(hits.get(_LOGIC, _NONE))
    if " are " in t.norm and words & {"all", "some", "no"}:
        logic += _syllogisms(t.norm)
    if logic >= 2:
        s.add(min(logic, 3) * 1.0, "logic constraints")
    math = len(hits.get(_MATH, _NONE)) + _math_symbols(raw)
    if math:
        s.add(min(math, 3) * 1.0, "mathematical terms")
    if _COUNTING in hits:
        s.add(3.0, "counting problem")
    if _PROBABILITY in hits:
        s.add(2.0, "probability question")
    numbers = _numbers(raw) + len(words & _NUMBER_WORDS)
    if numbers >= 2 and (math or _QUESTION_CUES in hits):
        s.add(3.0 if numbers >= 3 else 2.5, f"quantitative problem ({numbers} numbers)")
    plan = _PLANNING in hits
    constraints = len(hits.get(_CONSTRAINTS, _NONE))
    if plan and constraints:
        s.add(1.5 + min(constraints, 3) * 0.75, "planning under constraints")
    elif constraints >= 2:
        s.add(min(constraints, 3) * 0.5, "constraints")
    if _OPTIMIZE in hits:
        s.add(2.0 if _has_objective(t) else 1.0, "optimization")
    if _TRADEOFF in hits or (("should i" in low or "should we" in low)
                             and _should_or(low)):
        s.add(2.0, "trade-off")
        if numbers >= 3:
            s.add(1.5, "with figures")
    return s


_NONE: set[str] = set()
_REASONING_FEATURES = frozenset({
    _PROVE, _PROOF_TERMS, _STEPS, _JUSTIFY, _PUZZLE, _PUZZLE_CUES, _LOGIC, _MATH, _COUNTING,
    _PROBABILITY,
    _QUESTION_CUES, _PLANNING, _CONSTRAINTS, _OPTIMIZE, _TRADEOFF})
_REASONING_GATE = _PROVE_VERBS | _RELATION_GATE | {"should"}
_MATH_OPERATOR_SET = frozenset(_MATH_OPERATORS)
_CODE_GATE = (_EXTENSIONS | _TECH | _ASK_TARGETS | _FIX_TARGETS | _CODE_WORDS
              | _LANGUAGE_WORDS)
# Every feature above in one index, so a text's words are looked up once.
_LEXICON = Lexicon(_FEATURES)
