// getdcmtags: print the sidecar JSON of DICOM files (SPEC §3), one compact object per line.
//
// The C++ twin of `mercli tags FILE...`: for the same file both print equal JSON. The rules
// (which keywords, in which order, how each VR becomes JSON) are written down once, in the
// module docstring of mercli/tags/__init__.py; this file follows them:
//
// - Keys are DICOM keywords in kSidecar order; TransferSyntaxUID comes from the file meta.
// - Text VRs are UTF-8 strings. LO LT PN SH ST UC UT are converted from (0008,0005) Specific
//   Character Set as pydicom's decode_bytes does (escape sequences, misspelled terms, bad
//   bytes replaced by U+FFFD), each codec through DCMTK's OFCharacterEncoding (iconv); the
//   other text VRs, and text in the default repertoire, are read as ISO 8859-1 like pydicom.
//   Trimming: trailing spaces and NULs of the whole value (AS CS DA DT TM UI PN), of each value
//   (LO SH UC), of the single value (LT ST UT); AE strips leading and trailing whitespace, UR
//   trailing whitespace.
// - IS US UL SS SL SV UV are JSON integers, DS FL FD JSON floats (FL as the shortest decimal
//   that reads back to the same 32-bit float). A value that does not parse, or is NaN or
//   infinite, stays a string. Several values make a list; missing and empty elements are left
//   out; SQ and binary VRs are skipped.
//
// Reading stops at the first top-level tag above (0028,0008) NumberOfFrames, so pixel data is
// never read. Damage before that point makes the file unreadable, as in mercli/tags/__init__.py (a value
// past the end of the data, more than 64 nested undefined-length sequences, ...); a data set
// whose encoding contradicts the meta's transfer syntax is read as its first element says. An
// unreadable file prints `Error: <reason> (<path>)` on stderr; the other files are still
// printed, and the exit code is then 1.
//
// Usage: getdcmtags FILE...   (and --publish: see kHelp below)
//
// Sources: this file (options, batch mode, main); getdcmtags/sidecar.cpp (which elements, how
// each becomes JSON), charset.cpp (Specific Character Set decoding), text.cpp (JSON text and
// Python number parsing); for --publish, spool.cpp (the spool protocol), names.cpp (safe
// names, ids, times) and fsutil.cpp (atomic file operations, crash points).

#include "getdcmtags/fsutil.h"
#include "getdcmtags/sidecar.h"
#include "getdcmtags/spool.h"

#include "dcmtk/config/osconfig.h"
#include "dcmtk/dcmdata/dctk.h"
#include "dcmtk/oflog/oflog.h"

#include <poll.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <exception>
#include <iostream>
#include <string>
#include <vector>

using namespace getdcmtags;

namespace {

const char kUsage[] =
    "Usage: getdcmtags FILE...\n"
    "       getdcmtags --publish --spool DIR --calling-aet AE --called-aet AE --address ADDR\n"
    "                  [--stdin] [--inject-error N] [FILE...]\n"
    "       getdcmtags --publish --spool DIR --stdin [--inject-error N]\n";

const char kHelp[] =
    "\n"
    "Without --publish: print the sidecar JSON of each FILE, one line each (as `mercli tags`).\n"
    "\n"
    "--publish: move each FILE (a complete Part 10 file on the spool's filesystem, e.g. what\n"
    "storescp wrote into a staging folder) into DIR/incoming/<series>/ with its sidecar, as\n"
    "`mercli receive` does: .tags written in the process' scratch folder tmp/<owner>/ (under a\n"
    "lease in leases/<owner>), .dcm and .tags made durable, both renamed in under a shared lock\n"
    "on the series folder, the renames made durable, a \"received\" event logged. Files come in\n"
    "batches (all the lines waiting on stdin, up to 256): one syncfs() before the renames and one\n"
    "after serve the whole batch. A file without\n"
    "SOP/Series/Study Instance UID (status 0xC212) or that cannot be parsed (0xC210) goes to\n"
    "DIR/error/<id>/ (instance.dcm + error.json with the reason) with a \"quarantined\" event.\n"
    "One line per file on stdout, flushed:\n"
    "  ok <series>/<instance>      published\n"
    "  error <id> <reason>         quarantined as error/<id>\n"
    "  fail <reason> (<path>)      not published (write error, missing file): file left as is\n"
    "--stdin: after the FILE arguments, read one line per file from stdin until EOF: either\n"
    "  PATH (sender from the options) or PATH<TAB>CALLING-AE<TAB>CALLED-AE<TAB>ADDRESS, so one\n"
    "  process serves files from many associations (mercli receive --engine dcmtk).\n"
    "Exit: 0 all published, 1 some quarantined or failed, 2 usage, 4 spool unusable.\n"
    "\n"
    "--inject-error N: crash (_exit(70), nothing cleaned up) at point N, for tests:\n"
    "  1  before the batch's files are synced (nothing in the spool yet)\n"
    "  2  after the .tags is written in tmp/<owner>/ and synced, before the series folder is\n"
    "     locked\n"
    "  3  after the .dcm is renamed into incoming/<series>/, before the .tags is\n"
    "  4  after the renames of the batch, before they are synced\n"
    "  5  after publishing, before the \"received\" event is logged\n"
    "  6  quarantine: error/<id> built in tmp/<owner>/, before it is renamed into error/\n"
    "  7  at start: lease written as tmp/lease.<owner>, before it is renamed into leases/\n";

// Reads lines from a file descriptor in batches: next() blocks until at least one complete
// line (or EOF) and returns every complete line available at that moment, at most kMax.
class LineReader {
  public:
    explicit LineReader(int fd) : fd_(fd) {}

    bool next(std::vector<std::string> &lines) {
        lines.clear();
        while (!eof_ && buffer_.find('\n') == std::string::npos) fill();
        for (;;) {
            size_t start = 0;
            for (size_t end; lines.size() < kMax && (end = buffer_.find('\n', start)) != std::string::npos;
                 start = end + 1)
                lines.push_back(buffer_.substr(start, end - start));
            buffer_.erase(0, start);
            if (lines.size() >= kMax || eof_ || !readable()) break;
            fill();
        }
        if (eof_ && !buffer_.empty() && lines.size() < kMax) {
            lines.push_back(buffer_);
            buffer_.clear();
        }
        return !lines.empty() || !eof_;
    }

  private:
    static constexpr size_t kMax = 256;

    void fill() {
        char chunk[65536];
        ssize_t n = read(fd_, chunk, sizeof chunk);
        if (n < 0 && errno == EINTR) return;
        if (n <= 0) {
            eof_ = true;
            return;
        }
        buffer_.append(chunk, static_cast<size_t>(n));
    }

    bool readable() {
        struct pollfd pfd = {fd_, POLLIN, 0};
        return poll(&pfd, 1, 0) > 0;
    }

    int fd_;
    bool eof_ = false;
    std::string buffer_;
};

std::vector<std::string> splitTabs(const std::string &line) {
    std::vector<std::string> fields;
    size_t start = 0;
    for (size_t tab; (tab = line.find('\t', start)) != std::string::npos; start = tab + 1)
        fields.push_back(line.substr(start, tab - start));
    fields.push_back(line.substr(start));
    return fields;
}

int publishMain(int argc, char *argv[]) {
    std::string spoolDir;
    Sender info;
    bool haveCalling = false, haveCalled = false, haveAddress = false, fromStdin = false;
    std::vector<std::string> files;
    for (int i = 1; i < argc; ++i) {
        std::string arg = argv[i];
        auto value = [&](bool &seen) -> std::string {
            if (i + 1 >= argc) {
                std::cerr << "Error: " << arg << " needs a value\n" << kUsage;
                std::exit(2);
            }
            seen = true;
            return argv[++i];
        };
        bool seen = false;
        if (arg == "--publish") {
        } else if (arg == "--stdin") {
            fromStdin = true;
        } else if (arg == "--spool") {
            spoolDir = value(seen);
        } else if (arg == "--calling-aet") {
            info.callingAet = value(haveCalling);
        } else if (arg == "--called-aet") {
            info.calledAet = value(haveCalled);
        } else if (arg == "--address") {
            info.address = value(haveAddress);
        } else if (arg == "--inject-error") {
            gInject = std::atoi(value(seen).c_str());
        } else if (arg == "--") {
            for (++i; i < argc; ++i) files.push_back(argv[i]);
        } else if (arg.size() > 1 && arg[0] == '-') {
            std::cerr << "Error: unknown option " << arg << "\n" << kUsage;
            return 2;
        } else {
            files.push_back(arg);
        }
    }
    bool haveSender = haveCalling && haveCalled && haveAddress;
    if (spoolDir.empty() || (files.empty() && !fromStdin) || (!files.empty() && !haveSender)) {
        std::cerr << "Error: --publish needs --spool, and files with --calling-aet, --called-aet "
                     "and --address, or --stdin\n"
                  << kUsage;
        return 2;
    }
    Spool spool(spoolDir);
    try {
        spool.open();
    } catch (const std::exception &error) {
        std::cerr << "Error: spool unusable: " << error.what() << "\n";
        return 4;
    }
    int exitCode = 0;
    auto run = [&](std::vector<Spool::Entry> &batch) {
        if (batch.empty()) return;
        if (!spool.publishBatch(batch)) exitCode = 1;
        for (const auto &entry : batch) std::cout << entry.line << '\n';
        std::cout.flush();  // a supervisor reads the answers as they come
        batch.clear();
    };
    std::vector<Spool::Entry> batch;
    for (const std::string &path : files) batch.push_back({path, info, "", false, {}, "", "", ""});
    run(batch);
    if (fromStdin) {
        LineReader reader(0);
        std::vector<std::string> lines;
        while (reader.next(lines)) {  // every complete line available now: one batch
            for (std::string &line : lines) {
                if (!line.empty() && line.back() == '\r') line.pop_back();
                if (line.empty()) continue;
                std::vector<std::string> fields = splitTabs(line);
                if (fields.size() == 4) {
                    Sender sender{fields[1], fields[2], fields[3]};
                    batch.push_back({fields[0], sender, "", false, {}, "", "", ""});
                } else if (fields.size() == 1 && haveSender) {
                    batch.push_back({fields[0], info, "", false, {}, "", "", ""});
                } else {
                    run(batch);  // keep the answers in input order
                    exitCode = 1;
                    std::cout << "fail want PATH or PATH<TAB>CALLING<TAB>CALLED<TAB>ADDRESS ("
                              << fields[0] << ")" << std::endl;
                }
            }
            run(batch);
        }
    }
    spool.close();
    return exitCode;
}

}  // namespace

int main(int argc, char *argv[]) {
    bool publish = false;
    for (int i = 1; i < argc; ++i) {
        std::string arg = argv[i];
        if (arg == "--help" || arg == "-h") {
            std::cout << kUsage << kHelp;
            return 0;
        }
        publish = publish || arg == "--publish";
    }
    if (argc < 2) {
        std::cerr << kUsage;
        return 2;
    }
    OFLog::configure(OFLogger::FATAL_LOG_LEVEL);
    dcmEnableAutomaticInputDataCorrection.set(OFFalse);  // keep values as stored: we trim
    dcmAcceptUnexpectedImplicitEncoding.set(OFTrue);  // as pydicom: implicit VR despite the TS
    dcmAutoDetectDatasetXfer.set(OFTrue);  // as pydicom: the encoding the data set really has
    if (!dcmDataDict.isDictionaryLoaded()) {
        std::cerr << "Error: no DICOM data dictionary loaded (" DCM_DICT_DEFAULT_PATH ")\n";
        return 1;
    }
    if (publish) return publishMain(argc, argv);
    int exitCode = 0;
    for (int i = 1; i < argc; ++i) {
        try {
            std::string line = sidecar(argv[i]);
            std::cout << line << '\n';
        } catch (const Unreadable &error) {
            std::cout.flush();
            std::cerr << "Error: " << error.what() << " (" << argv[i] << ")\n";
            exitCode = 1;
        }
    }
    std::cout.flush();
    return exitCode;
}
