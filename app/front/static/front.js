// The try-it page. Plain JavaScript, no framework, no eval, no innerHTML: everything the user
// typed reaches the DOM through textContent or attribute setters only (the page's CSP allows
// no inline script either). Every byte count shown is the size of a body the proxy really sent.
"use strict";

(() => {
  const ORIGINAL = { w: "0", q: "100", format: "webp" }; // full size, near-lossless: the "original" on screen
  // format=auto negotiates on Accept; fetch() sends */* (WebP), an <img> in a modern browser
  // names AVIF. Send what an <img> sends so the bytes counted are the bytes displayed.
  const IMG_ACCEPT = "image/avif,image/webp,image/apng,image/*,*/*;q=0.8";
  const RETRIES = 3; // for 503 Busy, which comes with Retry-After
  const PARALLEL = 2; // renders in flight for the width table; more only queue in the proxy
  const STATUS_NAMES = { 400: "Bad Request", 404: "Not Found", 502: "Bad Gateway", 503: "Service Unavailable",
    504: "Gateway Timeout", 500: "Internal Server Error" };

  let config = { widths: [320, 640, 960, 1280, 1920], allowed_widths: [], max_width: 8192, default_quality: 75 };
  let currentRun = 0; // a newer submit makes an older run stop writing to the page

  const $ = (selector, root = document) => root.querySelector(selector);
  const form = $("#try");

  function setState(state) {
    document.body.dataset.state = state; // idle | working | done | error (tests wait on it)
  }

  function say(text) {
    $("#status").textContent = text;
  }

  function imageUrl(params) {
    const query = new URLSearchParams();
    for (const name of ["url", "w", "q", "format"]) {
      if (params[name] !== undefined && params[name] !== "") query.set(name, params[name]);
    }
    return `${location.origin}/image?${query.toString()}`;
  }

  function formParams() {
    const data = new FormData(form);
    return { url: String(data.get("url") || "").trim(), w: String(data.get("w") || ""),
      q: String(data.get("q") || ""), format: String(data.get("format") || "webp") };
  }

  function fillForm(params) {
    for (const name of ["url", "w", "q", "format"]) {
      if (params[name] !== null && params[name] !== undefined) form.elements[name].value = params[name];
    }
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  async function readReason(response) {
    const text = await response.text();
    try {
      const body = JSON.parse(text);
      if (body && typeof body.error === "string") return body.error;
    } catch (_) { /* not JSON: show the text itself */ }
    return text.slice(0, 500) || "(empty response)";
  }

  // One GET of an /image URL: the body's real size, or the proxy's JSON reason.
  async function fetchImage(url, accept) {
    for (let attempt = 0; ; attempt += 1) {
      let response;
      try {
        response = await fetch(url, accept ? { headers: { Accept: accept } } : {});
      } catch (error) {
        return { ok: false, status: 0, reason: `the request failed: ${error.message}` };
      }
      if (response.status === 503 && attempt < RETRIES) {
        const seconds = Math.min(5, Math.max(1, Number(response.headers.get("Retry-After")) || 1));
        await response.arrayBuffer();
        await sleep(seconds * 1000);
        continue;
      }
      if (!response.ok) return { ok: false, status: response.status, reason: await readReason(response) };
      const blob = await response.blob();
      const header = (name) => response.headers.get(name);
      return {
        ok: true, status: response.status, bytes: blob.size, contentLength: Number(header("Content-Length")),
        contentType: header("Content-Type") || blob.type, cache: header("X-Cache") || "",
        quality: header("X-Quality") || "",
        source: { bytes: Number(header("X-Source-Bytes")) || 0, width: Number(header("X-Source-Width")) || 0,
          height: Number(header("X-Source-Height")) || 0, format: header("X-Source-Format") || "" },
      };
    }
  }

  function showImage(img, url) {
    img.src = url;
    return img.decode().catch(() => undefined);
  }

  // -- formatting ---------------------------------------------------------------------------

  const exact = (n) => n.toLocaleString("en-US");

  function humanBytes(n) {
    if (n < 1000) return `${n} B`;
    if (n < 1000 * 1000) return `${(n / 1000).toFixed(1)} kB`;
    return `${(n / 1000 / 1000).toFixed(2)} MB`;
  }

  function formatName(contentTypeOrName) {
    const name = contentTypeOrName.replace(/^image\//, "").toLowerCase();
    return { webp: "WebP", avif: "AVIF", jpeg: "JPEG", png: "PNG", gif: "GIF", bmp: "BMP", tiff: "TIFF" }[name]
      || name.toUpperCase();
  }

  function setBytes(element, n) {
    element.replaceChildren();
    element.dataset.bytes = String(n);
    const big = document.createElement("strong");
    big.textContent = humanBytes(n);
    const small = document.createElement("small");
    small.textContent = `${exact(n)} bytes`;
    element.append(big, " ", small);
  }

  function fact(card, name) {
    return card.querySelector(`[data-fact="${name}"]`);
  }

  const escapeAttribute = (text) => text.replace(/&/g, "&amp;").replace(/"/g, "&quot;")
    .replace(/</g, "&lt;").replace(/>/g, "&gt;");

  // -- error --------------------------------------------------------------------------------

  function showError(result, url) {
    const section = $("#error");
    const name = STATUS_NAMES[result.status] || "";
    $("h2", section).textContent = result.status >= 500 || !result.status
      ? "The proxy could not get this image" : "The proxy refused this image";
    $(".error-status", section).textContent = result.status ? `${result.status} ${name}`.trim() : "no answer";
    $(".error-reason", section).textContent = result.reason;
    $(".error-url code", section).textContent = url;
    section.hidden = false;
    say("");
    setState("error");
  }

  // -- one run ------------------------------------------------------------------------------

  async function run(params) {
    const run = ++currentRun;
    const alive = () => run === currentRun;
    for (const id of ["#error", "#result", "#responsive"]) $(id).hidden = true;
    setState("working");
    say("Fetching through the proxy…");

    const optimizedUrl = imageUrl(params);
    const originalUrl = imageUrl({ url: params.url, ...ORIGINAL });
    const accept = params.format === "auto" ? IMG_ACCEPT : null;
    const [optimized, original] = await Promise.all([fetchImage(optimizedUrl, accept), fetchImage(originalUrl)]);
    if (!alive()) return;
    if (!optimized.ok) return showError(optimized, optimizedUrl);
    if (!original.ok) return showError(original, originalUrl);

    const originalCard = $("#original");
    const optimizedCard = $("#optimized");
    const originalImg = $("img", originalCard);
    const optimizedImg = $("img", optimizedCard);
    await Promise.all([showImage(originalImg, originalUrl), showImage(optimizedImg, optimizedUrl)]);
    if (!alive()) return;

    // The source as the proxy fetched it; entries cached before X-Source-* existed lack the
    // size, and then the full-size render (w=0 is the source width) stands in for it.
    const source = original.source;
    const sourceWidth = source.width || originalImg.naturalWidth;
    const sourceHeight = source.height || originalImg.naturalHeight;
    if (source.bytes) setBytes(fact(originalCard, "bytes"), source.bytes);
    else fact(originalCard, "bytes").textContent = "unknown";
    fact(originalCard, "dimensions").textContent = `${sourceWidth} × ${sourceHeight}`;
    fact(originalCard, "format").textContent = source.format ? formatName(source.format) : "unknown";
    fact(originalCard, "note").textContent =
      `Shown through the proxy at full size as WebP q100 (${exact(original.bytes)} bytes), so this page loads nothing from the source's host.`;

    setBytes(fact(optimizedCard, "bytes"), optimized.bytes);
    fact(optimizedCard, "bytes").dataset.contentLength = String(optimized.contentLength);
    fact(optimizedCard, "dimensions").textContent = `${optimizedImg.naturalWidth} × ${optimizedImg.naturalHeight}`;
    const servedFormat = formatName(optimized.contentType);
    fact(optimizedCard, "format").textContent = params.format === "auto" ? `${servedFormat} (auto)` : servedFormat;
    const cacheNote = { HIT: "Served from the cache", MISS: "Rendered just now", BYPASS: "Served without the cache" };
    fact(optimizedCard, "note").textContent = `${cacheNote[optimized.cache] || "Served"} (X-Cache: ${optimized.cache}).`
      + (params.format === "auto" ? " format=auto: what a browser that accepts AVIF gets." : "")
      + (optimized.quality ? ` q=auto chose quality ${optimized.quality} (X-Quality).` : "");

    const saving = fact(optimizedCard, "saving");
    if (source.bytes) {
      const percent = (1 - optimized.bytes / source.bytes) * 100;
      saving.textContent = percent >= 0 ? `${percent.toFixed(1)} % smaller` : `${(-percent).toFixed(1)} % larger`;
      saving.dataset.percent = percent.toFixed(1);
      saving.classList.toggle("worse", percent < 0);
    } else {
      saving.textContent = "";
    }

    $("#image-url").textContent = optimizedUrl;
    const fileName = `image.${servedFormat.toLowerCase()}`;
    const acceptFlag = params.format === "auto" ? `-H 'Accept: image/avif,image/webp' ` : "";
    $("#curl-command").textContent = `curl ${acceptFlag}-o ${fileName} '${optimizedUrl.replace(/'/g, "'\\''")}'`;
    $("#result").hidden = false;

    await responsive(params, sourceWidth, sourceHeight, alive);
  }

  // The usual widths below the source width, then the source width itself (w=0), which is
  // what any larger w would give anyway: the proxy never enlarges.
  function rowWidths(sourceWidth) {
    const row = [];
    for (const width of config.widths) {
      if (width < sourceWidth) {
        row.push({ w: String(width), width });
      } else {
        row.push({ w: "0", width: sourceWidth });
        break;
      }
    }
    if (row.length === 0) row.push({ w: "0", width: sourceWidth });
    return row;
  }

  async function inParallel(tasks, limit, onDone) {
    const results = new Array(tasks.length);
    let next = 0;
    async function worker() {
      while (next < tasks.length) {
        const index = next++;
        results[index] = await tasks[index]();
        onDone();
      }
    }
    await Promise.all(Array.from({ length: Math.min(limit, tasks.length) }, worker));
    return results;
  }

  async function responsive(params, sourceWidth, sourceHeight, alive) {
    const quality = params.q;
    const row = rowWidths(sourceWidth);
    const cells = [];
    for (const entry of row) {
      for (const format of ["webp", "avif"]) {
        cells.push({ entry, format, url: imageUrl({ url: params.url, w: entry.w, q: quality, format }) });
      }
    }
    let done = 0;
    say(`Rendering ${cells.length} responsive variants… 0/${cells.length}`);
    const results = await inParallel(cells.map((cell) => () => fetchImage(cell.url)), PARALLEL, () => {
      done += 1;
      if (alive()) say(`Rendering ${cells.length} responsive variants… ${done}/${cells.length}`);
    });
    if (!alive()) return;
    cells.forEach((cell, index) => { cell.result = results[index]; });

    const largest = Math.max(1, ...cells.filter((c) => c.result.ok).map((c) => c.result.bytes));
    const tbody = $("#width-rows");
    tbody.replaceChildren();
    for (const entry of row) {
      const tr = document.createElement("tr");
      const th = document.createElement("th");
      th.scope = "row";
      th.textContent = entry.w === "0" ? `${entry.width} (source)` : String(entry.width);
      tr.append(th);
      for (const cell of cells.filter((c) => c.entry === entry)) {
        tr.append(sizeCell(cell, largest));
      }
      tbody.append(tr);
    }

    const good = (format) => row.filter((entry) => cells.some((c) => c.entry === entry && c.format === format && c.result.ok))
      .map((entry) => ({ ...entry, url: imageUrl({ url: params.url, w: entry.w, q: quality, format }) }));
    writeSnippets(good("webp"), good("avif"), sourceWidth, sourceHeight);
    $("#responsive").hidden = false;
    const failures = cells.filter((c) => !c.result.ok).length;
    say(failures ? `${failures} of ${cells.length} variants failed; see the table.` : "");
    setState("done");
  }

  function sizeCell(cell, largest) {
    const td = document.createElement("td");
    td.dataset.format = cell.format;
    td.dataset.url = cell.url;
    if (!cell.result.ok) {
      td.classList.add("failed");
      td.textContent = `${cell.result.status}: ${cell.result.reason}`;
      return td;
    }
    td.dataset.bytes = String(cell.result.bytes);
    td.dataset.contentLength = String(cell.result.contentLength);
    const label = document.createElement("span");
    label.className = "size";
    label.textContent = humanBytes(cell.result.bytes);
    label.title = `${exact(cell.result.bytes)} bytes`;
    const bar = document.createElement("span");
    bar.className = `bar bar-${cell.format}`;
    // CSSOM, not a style attribute: the CSP forbids inline styles, not script-set properties.
    bar.style.width = `${Math.max(2, (cell.result.bytes / largest) * 100).toFixed(1)}%`;
    const track = document.createElement("span");
    track.className = "track";
    track.append(bar);
    td.append(label, track);
    return td;
  }

  function writeSnippets(webp, avif, sourceWidth, sourceHeight) {
    const srcset = (entries) => entries.map((e) => `${escapeAttribute(e.url)} ${e.width}w`).join(",\n    ");
    const top = webp.length ? webp[webp.length - 1].width : sourceWidth;
    const sizes = `(max-width: ${top}px) 100vw, ${top}px`;
    const fallback = webp.filter((e) => e.width <= 960).pop() || webp[0];
    const height = Math.round((sourceHeight * top) / sourceWidth);
    const common = `sizes="${sizes}"\n  width="${top}" height="${height}" alt="" loading="lazy" decoding="async"`;
    const img = fallback
      ? `<img src="${escapeAttribute(fallback.url)}"\n  srcset="${srcset(webp)}"\n  ${common}>`
      : "<!-- no WebP variant could be rendered -->";
    $("#srcset-snippet").textContent = img;
    const avifSource = avif.length
      ? `  <source type="image/avif"\n    srcset="${srcset(avif).replace(/\n {4}/g, "\n      ")}"\n    sizes="${sizes}">\n`
      : "";
    $("#picture-snippet").textContent = `<picture>\n${avifSource}  ${img.replace(/\n/g, "\n  ")}\n</picture>`;
  }

  // -- wiring -------------------------------------------------------------------------------

  function paramsFromLocation() {
    const query = new URLSearchParams(location.search);
    return { url: query.get("url"), w: query.get("w"), q: query.get("q"), format: query.get("format") };
  }

  function copy(button) {
    const code = document.getElementById(button.dataset.copy);
    const text = code.textContent;
    const done = () => {
      button.textContent = "Copied";
      setTimeout(() => { button.textContent = "Copy"; }, 1500);
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, () => select(code));
    } else {
      select(code);
    }
  }

  function select(element) {
    const range = document.createRange();
    range.selectNodeContents(element);
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
  }

  function describeWidths() {
    const list = $("#allowed-widths");
    list.replaceChildren();
    for (const width of [0, ...config.widths]) {
      const option = document.createElement("option");
      option.value = String(width);
      list.append(option);
    }
    $("#width-hint").textContent = config.allowed_widths.length
      ? `This service accepts w = 0 or one of ${config.allowed_widths.join(", ")}.`
      : `Any width up to ${exact(config.max_width)} px, 0 for the source width; images are never enlarged.`;
  }

  async function loadConfig() {
    try {
      const response = await fetch("/front/config.json");
      if (response.ok) config = await response.json();
    } catch (_) { /* keep the defaults: the proxy will still say what it refuses */ }
    describeWidths();
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const params = formParams();
    const query = new URLSearchParams();
    for (const [name, value] of Object.entries(params)) if (value) query.set(name, value);
    history.pushState(null, "", `/?${query.toString()}`);
    run(params);
  });

  document.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-copy]");
    if (button) copy(button);
  });

  window.addEventListener("popstate", () => {
    const params = paramsFromLocation();
    if (params.url) {
      fillForm(params);
      run(formParams());
    }
  });

  setState("idle");
  loadConfig().then(() => {
    document.body.dataset.ready = "yes";
    const params = paramsFromLocation();
    if (params.url) {
      fillForm(params);
      run(formParams());
    }
  });
})();
